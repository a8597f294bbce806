"""Locust user for the caption endpoints: procedural test scenes in several sizes, formats and modes,
uploaded as multipart files and sent as base64 JSON, greedy and beam, plus the streaming route."""

from __future__ import annotations

import base64
import io
import random
import uuid

from locust import FastHttpUser, between, tag, task
from PIL import Image

from training.scenes import make_scene

# (format, save options, Pillow mode, side): small PNG/WebP, large JPEG, grey, palette, RGBA.
VARIANTS = [
    ("PNG", {}, "RGB", 64),
    ("PNG", {}, "RGBA", 128),
    ("PNG", {}, "P", 96),
    ("JPEG", {"quality": 90}, "RGB", 256),
    ("JPEG", {"quality": 80}, "L", 512),
    ("WEBP", {"lossless": True}, "RGB", 64),
    ("WEBP", {"quality": 85}, "RGB", 200),
]
MIME = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp"}


def render(seed: int, fmt: str, options: dict, mode: str, side: int) -> bytes:
    scene = make_scene(seed, "test_fresh")
    image = Image.fromarray(scene.image).resize((side, side), Image.Resampling.NEAREST).convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


# Rendered once per Locust process: (name, bytes, mime type), 4 scenes x every variant.
PAYLOADS = [(f"{fmt.lower()}-{mode}-{side}", render(seed, fmt, options, mode, side), MIME[fmt])
            for seed in range(4) for fmt, options, mode, side in VARIANTS]


class CaptionUser(FastHttpUser):
    wait_time = between(0.0, 0.05)

    @tag("caption")
    @task(4)
    def caption_upload(self) -> None:
        name, data, mime = random.choice(PAYLOADS)
        beam_size = random.choice((1, 1, 3))
        body, content_type = multipart(f"{name}.img", data, mime, {"beam_size": str(beam_size)})
        with self.client.post("/v1/caption/upload", data=body, headers={"Content-Type": content_type},
                              name=f"/v1/caption/upload [beam {beam_size}]",
                              catch_response=True) as response:
            check(response, beam_size)

    @tag("caption")
    @task(3)
    def caption_base64(self) -> None:
        _, data, _ = random.choice(PAYLOADS)
        beam_size = random.choice((1, 2, 4))
        body = {"image": base64.b64encode(data).decode(), "beam_size": beam_size}
        with self.client.post("/v1/caption", json=body, name=f"/v1/caption [beam {beam_size}]",
                              catch_response=True) as response:
            check(response, beam_size)

    @tag("caption")
    @task(1)
    def caption_stream(self) -> None:
        _, data, _ = random.choice(PAYLOADS)
        body = {"image": base64.b64encode(data).decode()}
        with self.client.post("/v1/caption/stream", json=body, name="/v1/caption/stream",
                              catch_response=True) as response:
            events = [line for line in response.text.splitlines() if line.startswith("data: ")]
            if response.status_code != 200:
                response.failure(f"status {response.status_code}: {response.text[:200]}")
            elif not events or '"done":true' not in events[-1]:
                response.failure(f"stream did not end with a summary: {response.text[-200:]}")
            else:
                response.success()


def multipart(filename: str, data: bytes, mime: str, fields: dict[str, str]) -> tuple[bytes, str]:
    """A multipart/form-data body with the file as field ``image`` (FastHttpUser has no ``files=``)."""
    boundary = "rnnserve-" + uuid.uuid4().hex
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{key}"\r\n\r\n{value}\r\n'.encode()
             for key, value in fields.items()]
    parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{filename}"\r\n'
                 f"Content-Type: {mime}\r\n\r\n".encode() + data + b"\r\n")
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


def check(response, beam_size: int) -> None:
    if response.status_code != 200:
        response.failure(f"status {response.status_code}: {response.text[:200]}")
        return
    body = response.json()
    words = body.get("caption", "").split()
    if body.get("beam_size") != beam_size or len(words) != len(body.get("tokens", [])):
        response.failure(f"malformed result: {str(body)[:200]}")
    elif not all(0 <= t["probability"] <= 1 for t in body["tokens"]):
        response.failure("token probability outside [0, 1]")
    else:
        response.success()
