"""The caption service's pure helpers, without a server: prepare -> to_batch -> decode -> results."""

from __future__ import annotations

import asyncio
import base64
import io
from http import HTTPStatus

import numpy as np
import pytest
import torch
from bentoml.exceptions import BentoMLException
from PIL import Image
from pydantic import ValidationError

from models.caption import EOS_ID, CaptionConfig, Captioner, caption_vocab
from models.images import ImageLimits
from services.caption import (
    Decoder,
    caption_images,
    caption_result,
    caption_scheduler,
    caption_sequence,
    encode_pixels,
    prepare_image,
    prepare_item,
    read_upload,
    sse,
    to_batch,
)
from services.schemas.caption import (
    CAPTION_EXAMPLE,
    EXAMPLE_IMAGE_BASE64,
    MAX_BEAM_SIZE,
    MAX_LENGTH,
    CaptionItem,
    CaptionRequest,
    CaptionSpec,
    StreamEnd,
    StreamRequest,
)
from training.export import script

SIZE = 16
WORDS = ["a", "red", "blue", "circle", "square", "at", "the", "top"]


@pytest.fixture(scope="module")
def decoder() -> Decoder:
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    vocab = caption_vocab(WORDS)
    config = CaptionConfig(vocab_size=len(vocab), image_size=SIZE, channels=(4, 6, 8), embedding_dim=8,
                           hidden_size=12, cell="gru", attention=True, attention_size=6, dropout=0.0)
    model = Captioner(config).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.6)
        model.output.bias[EOS_ID] += 1.0
    metadata = {"vocab": vocab, "image_size": SIZE, "special_ids": {"pad": 0, "bos": 2, "eos": 3},
                "normalisation": {"mean": [0.3, 0.3, 0.3], "std": [0.2, 0.2, 0.2]}}
    yield Decoder.from_metadata(script(model), metadata)
    torch.set_num_threads(previous)


def item(seed: int, beam_size: int = 1, max_length: int = 12) -> CaptionItem:
    pixels = np.random.default_rng(seed).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    return CaptionItem(pixels=encode_pixels(pixels), beam_size=beam_size, max_length=max_length)


def test_batched_captions_equal_single_calls_with_mixed_beams_and_limits(decoder):
    items = [item(0), item(1, 3, 5), item(2, 1, 2), item(3, 2), item(4, 3, 12), item(5, 1, 7), item(6)]
    batched = caption_images(decoder, items)
    singles = [caption_images(decoder, [one])[0] for one in items]
    assert len(batched) == len(items)
    for many, one, request in zip(batched, singles, items, strict=True):
        assert many.caption == one.caption and many.complete == one.complete
        assert many.steps == one.steps <= request.max_length
        assert [t.token for t in many.tokens] == [t.token for t in one.tokens]
        assert [t.probability for t in many.tokens] == pytest.approx([t.probability for t in one.tokens],
                                                                     rel=1e-4)
    assert len({r.caption for r in batched}) > 1, "tiny model should not give every image one caption"


def test_results_carry_words_probabilities_and_the_end(decoder):
    for result in caption_images(decoder, [item(seed, max_length=10) for seed in range(12)]):
        assert result.caption == " ".join(t.token for t in result.tokens)
        assert all(0.0 <= t.probability <= 1.0 for t in result.tokens)
        assert "<eos>" not in result.caption and "<pad>" not in result.caption
        assert result.steps == len(result.tokens) + (1 if result.complete else 0)
        assert (result.end_probability is not None) == result.complete
        assert not result.complete or result.steps <= 10
        expected = sum(np.log(t.probability) for t in result.tokens)
        if result.complete:
            expected += np.log(result.end_probability)
        assert result.log_probability == pytest.approx(expected, abs=1e-4)


def test_scheduled_captions_equal_each_image_alone_whatever_arrives_when(decoder):
    # The decode loop (services/decoding.py) on the captioner: greedy and beam rows of mixed
    # lengths join a running batch at random steps; each caption equals the static path's alone.
    rng = np.random.default_rng(7)
    for max_rows in (4, 64):
        engine = caption_scheduler(decoder, max_rows=max_rows, max_queue=64)
        items = [item(seed, int(rng.choice([1, 1, 2, 3])), int(rng.integers(1, 13))) for seed in range(10)]
        sequences = [caption_sequence(decoder, engine, one, 60.0) for one in items]
        events: dict[int, list] = {}
        for index, sequence in enumerate(sequences):
            sequence.stream = index % 2 == 0
            sequence.notify = events.setdefault(index, []).append
        arrivals = sorted(zip(rng.integers(0, 8, len(items)).tolist(), range(len(items)), strict=True))
        step = 0
        while arrivals or engine.busy:
            while arrivals and arrivals[0][0] <= step:
                engine.submit([sequences[arrivals.pop(0)[1]]])
            engine.iterate()
            assert engine.active_rows <= max(max_rows, 3)
            step += 1
        for index, request in enumerate(items):
            *tokens, done = events[index]
            got = caption_result(decoder, done.hypothesis.tokens, done.hypothesis.token_logprobs)
            [alone] = caption_images(decoder, [request])
            assert got.caption == alone.caption and got.complete == alone.complete
            assert got.steps == alone.steps <= request.max_length
            assert got.log_probability == pytest.approx(alone.log_probability, abs=1e-4)
            if sequences[index].stream and request.beam_size == 1:  # a stream saw every token, <eos> too
                assert [t.token for t in tokens] == done.hypothesis.tokens


def test_to_batch_normalises_and_rejects_the_wrong_pixel_count(decoder):
    pixels = np.full((SIZE, SIZE, 3), 255, dtype=np.uint8)
    batch = to_batch(decoder, [CaptionItem(pixels=encode_pixels(pixels), max_length=3)])
    assert batch.shape == (1, 3, SIZE, SIZE)
    torch.testing.assert_close(batch, torch.full_like(batch, (1.0 - 0.3) / 0.2))
    with pytest.raises(ValueError, match=f"this model takes {SIZE}x{SIZE}x3"):
        to_batch(decoder, [CaptionItem(pixels=encode_pixels(pixels[:4]), max_length=3)])


def test_prepare_image_converts_any_upload_to_model_pixels():
    image = Image.new("LA", (300, 40), (90, 128))
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    decoded, pixels = prepare_image(buffer.getvalue(), 64)
    assert (decoded.mode, decoded.width, decoded.height) == ("LA", 300, 40)
    assert pixels.shape == (64, 64, 3) and pixels.dtype == np.uint8


SPEC = CaptionSpec(image_size=SIZE, mean=[0.3] * 3, std=[0.2] * 3, preprocess="", formats=["PNG"],
                   default_max_length=20, max_length_limit=MAX_LENGTH, max_beam_size=MAX_BEAM_SIZE,
                   max_image_bytes=1000, max_image_pixels=1000, vocab_size=12)


def test_prepare_item_uses_the_model_default_length_and_maps_rejections_to_http():
    decoded, built = asyncio.run(prepare_item(base64.b64decode(EXAMPLE_IMAGE_BASE64), SPEC, 2, None))
    assert (built.beam_size, built.max_length) == (2, 20) and decoded.format == "PNG"
    assert len(base64.b64decode(built.pixels)) == SIZE * SIZE * 3
    with pytest.raises(BentoMLException) as caught:
        asyncio.run(prepare_item(b"GIF89a not really", SPEC, 1, 5))
    assert caught.value.error_code == HTTPStatus.UNSUPPORTED_MEDIA_TYPE


def test_read_upload_refuses_an_oversized_file_before_reading(tmp_path):
    path = tmp_path / "big.png"
    path.write_bytes(b"\0" * 101)
    with pytest.raises(BentoMLException) as caught:
        read_upload(path, ImageLimits(max_bytes=100, max_pixels=10))
    assert caught.value.error_code == HTTPStatus.REQUEST_ENTITY_TOO_LARGE
    assert "the limit is 100 bytes" in str(caught.value)
    path.write_bytes(b"\0" * 100)
    assert read_upload(path, ImageLimits(max_bytes=100, max_pixels=10)) == b"\0" * 100


def test_request_accepts_base64_and_data_urls():
    assert CaptionRequest.model_validate(CAPTION_EXAMPLE).beam_size == 3
    url = CaptionRequest.model_validate({"image": "data:image/png;base64," + EXAMPLE_IMAGE_BASE64})
    assert url.image_bytes() == base64.b64decode(EXAMPLE_IMAGE_BASE64)
    assert StreamRequest.model_validate({"image": EXAMPLE_IMAGE_BASE64}).max_length is None


@pytest.mark.parametrize(("body", "message"), [
    ({"image": EXAMPLE_IMAGE_BASE64, "beam_size": 0}, "greater than or equal to 1"),
    ({"image": EXAMPLE_IMAGE_BASE64, "beam_size": MAX_BEAM_SIZE + 1},
     f"less than or equal to {MAX_BEAM_SIZE}"),
    ({"image": EXAMPLE_IMAGE_BASE64, "max_length": 0}, "greater than or equal to 1"),
    ({"image": EXAMPLE_IMAGE_BASE64, "max_length": MAX_LENGTH + 1}, f"less than or equal to {MAX_LENGTH}"),
    ({"image": "not base64 at all!"}, "not valid base64"),
    ({"image": ""}, "at least 1 character"),
    ({"image": EXAMPLE_IMAGE_BASE64, "colour": "red"}, "Extra inputs are not permitted"),
    ({}, "Field required"),
])
def test_request_rejects_bad_options_naming_the_limit(body, message):
    with pytest.raises(ValidationError, match=message):
        CaptionRequest.model_validate(body)


def test_stream_events_are_server_sent_events():
    event = sse(StreamEnd(caption="a red circle", complete=True, steps=4, model_version="v"))
    assert event.startswith("data: {") and event.endswith("}\n\n")
