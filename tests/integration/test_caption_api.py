"""Captioning through real HTTP on a real ``bentoml serve`` with the committed caption artifact."""

from __future__ import annotations

import base64
import io
import json
import math
import re
import struct
import time
import zlib
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from PIL import Image

from services.local_server import parse_metrics
from services.schemas.caption import (
    CAPTION_EXAMPLE,
    MAX_BEAM_SIZE,
    MAX_DECODE_BYTES,
    MAX_IMAGE_BYTES,
    MAX_IMAGE_PIXELS,
)
from training.scenes import make_scene, parse_caption


def scene_file(seed: int, fmt: str = "PNG", mode: str = "RGB", side: int = 64, **options) -> bytes:
    image = Image.fromarray(make_scene(seed, "test_fresh").image)
    image = image.resize((side, side), Image.Resampling.NEAREST).convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def decoder_steps(client: httpx.Client) -> tuple[float, float]:
    """(rows stepped, steps) of the caption decode loop (rnnserve_decoder_tokens_per_step)."""
    totals = {"sum": 0.0, "count": 0.0}
    for (name, labels), value in parse_metrics(client.get("/metrics").text).items():
        for kind in totals:
            if name == f"rnnserve_decoder_tokens_per_step_{kind}" and dict(labels).get("model") == "caption":
                totals[kind] += value
    return totals["sum"], totals["count"]


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def post_retrying_503(http: httpx.Client, route: str, **kwargs) -> httpx.Response:
    """A 503 is the batcher shedding load on a busy machine; nothing ran, so retry like a client."""
    for _ in range(50):
        response = http.post(route, **kwargs)
        if response.status_code != 503:
            return response
        time.sleep(0.1)
    return response


def upload(client, data: bytes, mime: str = "image/png", **fields) -> httpx.Response:
    return post_retrying_503(client, "/v1/caption/upload", files={"image": ("image", data, mime)},
                             data={k: str(v) for k, v in fields.items()})


def test_base64_caption_has_words_probabilities_and_model_version(client):
    response = post_retrying_503(client, "/v1/caption", json=CAPTION_EXAMPLE)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["caption"] == " ".join(t["token"] for t in body["tokens"])
    assert all(0 < t["probability"] <= 1 for t in body["tokens"])
    assert body["model"]["name"] == "caption" and body["model"]["version"]
    assert body["beam_size"] == CAPTION_EXAMPLE["beam_size"]
    assert body["image"] == {"format": "PNG", "mode": "RGB", "width": 64, "height": 64,
                             "bytes": len(base64.b64decode(CAPTION_EXAMPLE["image"]))}


def test_trained_model_describes_fresh_scenes(client):
    """The committed model, not a stub: on scenes it never saw, most captions are exactly right."""
    exact = 0
    for seed in range(8):
        response = post_retrying_503(client, "/v1/caption", json={"image": b64(scene_file(seed))})
        assert response.status_code == 200, response.text
        caption = response.json()["caption"]
        assert parse_caption(caption) is not None, caption
        exact += caption == make_scene(seed, "test_fresh").caption
    assert exact >= 5, f"only {exact}/8 exact captions"


FORMATS = [
    ("png-rgb", "image/png", lambda: scene_file(1)),
    ("png-rgba", "image/png", lambda: scene_file(1, mode="RGBA", side=128)),
    ("png-grey", "image/png", lambda: scene_file(1, mode="L")),
    ("png-palette", "image/png", lambda: scene_file(1, mode="P", side=96)),
    ("jpeg", "image/jpeg", lambda: scene_file(1, "JPEG", side=256, quality=95)),
    ("jpeg-grey", "image/jpeg", lambda: scene_file(1, "JPEG", mode="L")),
    ("webp-lossless", "image/webp", lambda: scene_file(1, "WEBP", lossless=True)),
    ("webp-lossy", "image/webp", lambda: scene_file(1, "WEBP", side=200, quality=90)),
]


@pytest.mark.parametrize(("name", "mime", "make"), FORMATS, ids=[f[0] for f in FORMATS])
def test_every_format_and_mode_is_accepted_by_upload_and_base64(client, name, mime, make):
    data = make()
    by_upload = upload(client, data, mime)
    by_json = post_retrying_503(client, "/v1/caption", json={"image": b64(data)})
    assert by_upload.status_code == by_json.status_code == 200, (by_upload.text, by_json.text)
    assert by_upload.json()["caption"] == by_json.json()["caption"]
    assert by_upload.json()["image"]["bytes"] == len(data)


def test_lossless_formats_give_the_same_caption(client):
    png = upload(client, scene_file(2)).json()
    webp = upload(client, scene_file(2, "WEBP", lossless=True), "image/webp").json()
    assert png["caption"] == webp["caption"]
    assert [t["probability"] for t in png["tokens"]] == pytest.approx(
        [t["probability"] for t in webp["tokens"]], abs=1e-6)


def test_beam_size_and_max_length_options(client):
    data = b64(scene_file(3))
    beam = post_retrying_503(client, "/v1/caption", json={"image": data, "beam_size": 4}).json()
    assert beam["beam_size"] == 4 and beam["complete"]
    short = post_retrying_503(client, "/v1/caption", json={"image": data, "max_length": 3}).json()
    assert short["steps"] <= 3 and len(short["tokens"]) <= 3 and not short["complete"]
    form = upload(client, scene_file(3), beam_size=2, max_length=5).json()
    assert form["beam_size"] == 2 and form["max_length"] == 5 and form["steps"] <= 5


def png_header_only(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + chunk(b"IEND", b""))


SIDE = int(MAX_IMAGE_PIXELS ** 0.5) + 1
BAD = [
    ("not-an-image", b"just some text, no pixels", 415, "not a PNG, JPEG or WebP"),
    ("truncated", scene_file(4)[:200], 400, "truncated"),
    ("zero-size", png_header_only(0, 12), 400, "needs at least 1x1"),
    ("over-pixel-limit", png_header_only(SIDE, SIDE), 413, f"the limit is {MAX_IMAGE_PIXELS:,} pixels"),
    ("decompression-bomb", png_header_only(60_000, 60_000), 413, f"the limit is {MAX_IMAGE_PIXELS:,} pixels"),
]


@pytest.mark.parametrize(("name", "data", "status", "message"), BAD, ids=[b[0] for b in BAD])
def test_every_bad_image_is_a_4xx_with_its_reason(client, name, data, status, message):
    as_json = post_retrying_503(client, "/v1/caption", json={"image": b64(data)})
    for response in (upload(client, data), as_json):
        assert response.status_code == status, response.text
        assert message in response.text


def grey16_png(side: int) -> bytes:
    """A real ``side`` x ``side`` 16-bit greyscale PNG: tens of kilobytes, 2 bytes per pixel decoded."""
    pixels = np.zeros((side, side), dtype=np.uint16)
    pixels[:, ::512] = 65535
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


def test_decode_budget_refuses_16bit_images_past_it_and_decodes_one_at_it(client):
    """Issue 13, finding 5: a 40 KB 16-bit PNG of 4096x4096 took an entry worker from 422 to 899 MiB."""
    probe = grey16_png(4096)
    assert len(probe) < 100_000
    as_json = post_retrying_503(client, "/v1/caption", json={"image": b64(probe)})
    for response in (upload(client, probe), as_json):
        assert response.status_code == 413, response.text
        assert response.json()["error"]["code"] == "image_too_large" and "the limit is" in response.text
    at_edge = math.isqrt(MAX_DECODE_BYTES // 2)  # 16-bit grey: 2 bytes per pixel
    past = upload(client, grey16_png(at_edge + 1))
    assert past.status_code == 413, past.text
    assert (f"decoding it takes {(at_edge + 1) ** 2 * 2:,} bytes; the limit is {MAX_DECODE_BYTES:,} bytes"
            in past.text)
    assert past.json()["error"]["field"] == "image"
    accepted = upload(client, grey16_png(at_edge))
    assert accepted.status_code == 200, accepted.text
    assert accepted.json()["image"] == {"format": "PNG", "mode": "I;16", "width": at_edge, "height": at_edge,
                                        "bytes": len(grey16_png(at_edge))}


def test_a_large_jpeg_photo_is_decoded_scaled_and_captioned(client):
    """A 12-megapixel JPEG is under the decode budget only because it is decoded DCT-scaled (1/8)."""
    data = scene_file(1, "JPEG", side=3000, quality=90)
    assert MAX_DECODE_BYTES < 3000 * 3000 * 4
    response = upload(client, data, "image/jpeg")
    assert response.status_code == 200, response.text
    assert response.json()["image"]["width"] == 3000
    assert response.json()["caption"] == upload(client, scene_file(1)).json()["caption"]


def test_an_image_over_the_byte_limit_is_a_413(client):
    data = scene_file(5) + b"\0" * MAX_IMAGE_BYTES  # a valid PNG followed by padding
    response = upload(client, data)
    assert response.status_code == 413, response.text[:300]
    assert f"{MAX_IMAGE_BYTES:,}" in response.text


@pytest.mark.parametrize("beam_size", [0, MAX_BEAM_SIZE + 1])
def test_beam_size_out_of_range_is_a_400_on_both_routes(client, beam_size):
    data = scene_file(6)
    as_json = post_retrying_503(client, "/v1/caption", json={"image": b64(data), "beam_size": beam_size})
    limit = "greater than or equal to 1" if beam_size < 1 else f"less than or equal to {MAX_BEAM_SIZE}"
    for response in (upload(client, data, beam_size=beam_size), as_json):
        assert response.status_code == 400, response.text
        assert "beam_size" in response.text and limit in response.text


def test_json_to_the_upload_route_and_bad_base64_are_refused(client):
    assert client.post("/v1/caption/upload", json=CAPTION_EXAMPLE).status_code == 415
    bad = client.post("/v1/caption", json={"image": "%%% not base64 %%%"})
    assert bad.status_code == 400 and "base64" in bad.text


def stream_events(client, body: dict) -> list[dict]:
    with client.stream("POST", "/v1/caption/stream", json=body) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line.startswith("data: ")]
    return [json.loads(line.removeprefix("data: ")) for line in lines]


def test_stream_sends_words_then_a_summary_equal_to_greedy(client):
    data = b64(scene_file(7))
    events = stream_events(client, {"image": data})
    *words, end = events
    assert end["done"] is True and end["complete"] is True
    assert [w["index"] for w in words] == list(range(len(words)))
    greedy = post_retrying_503(client, "/v1/caption", json={"image": data}).json()
    assert end["caption"] == greedy["caption"] == " ".join(w["token"] for w in words)
    assert [w["probability"] for w in words] == pytest.approx([t["probability"] for t in greedy["tokens"]],
                                                              abs=1e-5)


def test_stream_rejects_a_bad_image_before_streaming(client):
    response = client.post("/v1/caption/stream", json={"image": b64(b"definitely not an image")})
    assert response.status_code == 415 and "PNG, JPEG or WebP" in response.text


def test_concurrent_requests_are_batched_and_match_single_calls(client, server):
    files = [scene_file(seed) for seed in range(8)]
    singles = [post_retrying_503(client, "/v1/caption", json={"image": b64(f)}).json()["caption"]
               for f in files]
    before_rows, before_steps = decoder_steps(client)

    def one(i: int) -> str:
        with httpx.Client(base_url=server.url, timeout=120) as http:
            response = post_retrying_503(http, "/v1/caption", json={"image": b64(files[i % 8])})
            assert response.status_code == 200, response.text
            return response.json()["caption"]

    with ThreadPoolExecutor(max_workers=24) as pool:
        captions = list(pool.map(one, range(48)))
    assert captions == [singles[i % 8] for i in range(48)], "batching changed a caption"
    after_rows, after_steps = decoder_steps(client)
    rows, steps = after_rows - before_rows, after_steps - before_steps
    assert rows >= 48
    assert steps < rows, f"{steps} decoder steps for {rows} rows: no request shared a step"


def test_metrics_count_image_bytes_decode_steps_caption_length_and_rejections(client):
    upload(client, scene_file(9))
    upload(client, b"not an image")
    text = client.get("/metrics").text
    for pattern in (r'rnnserve_caption_image_bytes_count\{model="caption"\} [1-9]',
                    r'rnnserve_caption_decode_steps_count\{[^}]*model="caption"[^}]*\} [1-9]',
                    r'rnnserve_caption_length_tokens_count\{model="caption"\} [1-9]',
                    r'rnnserve_caption_rejected_images_total\{model="caption",status="415"\} [1-9]'):
        assert re.search(pattern, text), pattern


def test_spec_models_and_openapi_document_captioning(client):
    spec = client.post("/v1/caption/spec", json={}).json()
    assert spec["image_size"] == 64 and spec["max_beam_size"] == MAX_BEAM_SIZE
    assert spec["formats"] == ["PNG", "JPEG", "WEBP"]
    models = {m["name"]: m for m in client.post("/v1/models", json={}).json()}
    fresh = models["caption"]["metrics"]["test_fresh"]["greedy"]
    assert fresh["attribute_accuracy"] > 0.5 and "test_unseen" in models["caption"]["metrics"]
    paths = client.get("/docs.json").json()["paths"]
    for route in ("/v1/caption", "/v1/caption/upload", "/v1/caption/stream", "/v1/caption/spec"):
        assert route in paths, route
    assert np.isfinite(fresh["bleu4"])


def test_a_url_sent_as_the_image_field_is_refused_and_never_fetched(client):
    """SSRF probe: ``-F image=http://...`` made BentoML download the URL from the server."""
    import socket
    import threading

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    listener.settimeout(0.2)
    connections: list[object] = []
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                connection, _ = listener.accept()
            except TimeoutError:
                continue
            connections.append(connection)
            connection.close()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{listener.getsockname()[1]}/scene.png"
    shapes = [{"image": (None, url)}, {"image": (None, url), "beam_size": (None, "1")},
              {"image": (None, url.encode(), "image/png")}]
    try:
        with ThreadPoolExecutor(16) as pool:
            responses = list(pool.map(
                lambda i: post_retrying_503(client, "/v1/caption/upload", files=shapes[i % len(shapes)]),
                range(48)))
    finally:
        stop.set()
        thread.join()
        listener.close()
    for response in responses:
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert (error["code"], error["field"]) == ("invalid_multipart", "image"), error
        assert "never fetched" in error["message"]
    assert connections == []


def test_upload_form_fields_are_checked_before_bentoml_parses_them(client):
    cases = [
        ({"beam_sise": (None, "3")}, "unknown_field", "beam_sise"),
        ({"beam_size": ("b.bin", b"\xff\xfe\x00", "application/octet-stream")}, "invalid_multipart",
         "beam_size"),
        ({"max_length": (None, "9" * 5000)}, "invalid_multipart", "max_length"),
    ]
    for extra, code, field in cases:
        files = {"image": ("scene.png", scene_file(4), "image/png"), **extra}
        response = post_retrying_503(client, "/v1/caption/upload", files=files)
        assert response.status_code == 400, response.text
        assert (response.json()["error"]["code"], response.json()["error"]["field"]) == (code, field)
