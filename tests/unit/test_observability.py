"""Request ids (accepted or generated, echoed, in log records), the JSON log format, the new settings,
and RNNSERVE_DEVICE=cuda without a usable GPU."""

from __future__ import annotations

import asyncio
import json
import logging

import pytest
import torch

from models.artifact import ArtifactError
from services.observability import (
    REQUEST_ID,
    JsonFormatter,
    RequestId,
    RequestIdFilter,
    TextWithRequestId,
    accepted_id,
    configure_logging,
)
from services.settings import Settings

MAX = 32


def test_accepted_id_bounds_length_and_charset():
    assert accepted_id(b"a" * MAX, MAX) == "a" * MAX
    assert accepted_id(b"a" * (MAX + 1), MAX) is None
    assert accepted_id(b"", MAX) is None
    assert accepted_id(None, MAX) is None
    assert accepted_id(b"Req-1.2:3_x", MAX) == "Req-1.2:3_x"
    for bad in (b"a b", b"a\nb", b'a"b', b"a/b", "é".encode()):
        assert accepted_id(bad, MAX) is None, bad


def run(headers: list[tuple[bytes, bytes]]) -> tuple[list[tuple[bytes, bytes]], str | None]:
    seen: list[str | None] = []
    sent: list[dict] = []

    async def app(scope, receive, send):
        seen.append(REQUEST_ID.get())
        await send({"type": "http.response.start", "status": 200, "headers": [(b"x-request-id", b"old")]})
        await send({"type": "http.response.body", "body": b""})

    async def send(message):
        sent.append(message)

    async def receive():
        return {"type": "http.request", "body": b""}

    middleware = RequestId(app, max_chars=MAX)
    asyncio.run(middleware({"type": "http", "path": "/", "headers": headers}, receive, send))
    return sent[0]["headers"], seen[0]


def test_a_valid_id_is_echoed_once_and_seen_by_the_app():
    headers, seen = run([(b"x-request-id", b"caller-7")])
    assert [v for k, v in headers if k == b"x-request-id"] == [b"caller-7"]
    assert seen == "caller-7"


@pytest.mark.parametrize("headers", [[], [(b"x-request-id", b"x" * (MAX + 1))],
                                     [(b"x-request-id", b"a\x00b")],
                                     [(b"x-request-id", b"a"), (b"x-request-id", b"b")]])
def test_otherwise_an_id_is_generated(headers):
    echoed, seen = run(headers)
    [value] = [v for k, v in echoed if k == b"x-request-id"]
    assert len(value) == 32 and value.decode() == seen


def record(message: str = "hello") -> logging.LogRecord:
    item = logging.LogRecord("services.test", logging.WARNING, __file__, 1, message, None, None)
    RequestIdFilter().filter(item)
    return item


def test_log_records_carry_the_request_id_as_text_and_json():
    token = REQUEST_ID.set("rid-1")
    try:
        item = record()
    finally:
        REQUEST_ID.reset(token)
    assert TextWithRequestId(logging.Formatter("%(message)s")).format(item) == "hello (request_id=rid-1)"
    entry = json.loads(JsonFormatter().format(item))
    assert entry["request_id"] == "rid-1" and entry["message"] == "hello" and entry["level"] == "WARNING"
    outside = record("idle")
    assert TextWithRequestId(logging.Formatter("%(message)s")).format(outside) == "idle"
    assert json.loads(JsonFormatter().format(outside))["request_id"] is None


def test_configure_logging_installs_once_per_handler():
    logger = logging.getLogger("bentoml")
    handler = logging.StreamHandler()
    logger.addHandler(handler)
    try:
        assert handler in configure_logging("json")
        assert isinstance(handler.formatter, JsonFormatter)
        assert handler not in configure_logging("json")  # idempotent: one filter
        assert sum(isinstance(f, RequestIdFilter) for f in handler.filters) == 1
    finally:
        logger.removeHandler(handler)


def test_settings_bound_the_request_id_and_name_the_log_format():
    assert Settings.from_env({"RNNSERVE_MAX_REQUEST_ID_CHARS": "16"}).http.max_request_id_chars == 16
    assert Settings.from_env({"RNNSERVE_MAX_REQUEST_ID_CHARS": "1024"}).http.max_request_id_chars == 1024
    for bad in ("15", "1025"):
        with pytest.raises(ValueError, match="RNNSERVE_MAX_REQUEST_ID_CHARS"):
            Settings.from_env({"RNNSERVE_MAX_REQUEST_ID_CHARS": bad})
    assert Settings.from_env({"RNNSERVE_LOG_FORMAT": "json"}).log_format == "json"
    with pytest.raises(ValueError, match="RNNSERVE_LOG_FORMAT"):
        Settings.from_env({"RNNSERVE_LOG_FORMAT": "xml"})


@pytest.mark.parametrize("url", ["", "http://rnnserve-translate:3000", "https://10.0.0.7", "http://a.b/"])
def test_model_service_urls(url):
    assert Settings.from_env({"RNNSERVE_TRANSLATE_URL": url}).translate.url == url


@pytest.mark.parametrize("url", ["ftp://x", "http://a b", "rnnserve-translate:3000", "http://x/path?q=1"])
def test_a_bad_model_service_url_is_refused(url):
    with pytest.raises(ValueError, match="RNNSERVE_CAPTION_URL"):
        Settings.from_env({"RNNSERVE_CAPTION_URL": url})


def test_sentiment_has_no_url():
    assert "sentiment.url" not in Settings.env_names()


def test_cuda_on_a_cpu_only_torch_names_the_cause(monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", None)
    with pytest.raises(ArtifactError, match="CPU-only build: run the GPU image"):
        Settings.from_env({"RNNSERVE_DEVICE": "cuda"}).torch_device()


def test_cuda_without_a_gpu_names_the_cause(monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ArtifactError, match=r"sees no usable GPU: is nvidia\.com/gpu requested"):
        Settings.from_env({"RNNSERVE_DEVICE": "cuda"}).torch_device()
    assert Settings.from_env({"RNNSERVE_DEVICE": "auto"}).torch_device() == "cpu"
    assert Settings.from_env({"RNNSERVE_DEVICE": "cpu"}).torch_device() == "cpu"


def test_a_model_whose_device_is_unusable_is_kept_out_not_crashed(monkeypatch):
    from services.errors import ServiceError
    from services.inprocess import InProcessModel

    monkeypatch.setattr(torch.version, "cuda", None)
    settings = Settings.from_env({"RNNSERVE_DEVICE": "cuda"})
    model = InProcessModel("device-check", lambda: settings.torch_device())
    assert not model.ready and "CPU-only build" in model.error
    with pytest.raises(ServiceError) as refused:
        model.get()
    assert refused.value.status == 503


def test_generated_ids_are_unique_within_a_process_and_across_processes():
    import subprocess
    import sys

    from services.observability import new_id

    here = [new_id() for _ in range(10_000)]
    assert len(set(here)) == len(here) and all(len(i) == 32 and int(i, 16) >= 0 for i in here)
    code = "from services.observability import new_id; print(new_id())"
    others = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
              .stdout.strip() for _ in range(3)}
    assert len(others) == 3 and not others & set(here)
    assert len({i[:16] for i in others} | {here[0][:16]}) == 4  # a random prefix per process


def test_the_request_id_rides_every_propagated_call_and_a_model_service_adopts_it():
    import contextvars

    from opentelemetry import propagate

    from services.observability import REQUEST_ID, adopt_request_id, propagate_request_ids

    propagate_request_ids()
    propagate_request_ids()  # idempotent: one propagator, one header

    def call(request_id: str | None) -> dict[str, str]:
        REQUEST_ID.set(request_id)
        headers: dict[str, str] = {}
        propagate.inject(headers)
        return headers

    assert contextvars.copy_context().run(call, "entry-7")["x-request-id"] == "entry-7"
    assert "x-request-id" not in contextvars.copy_context().run(call, None)

    def adopted(headers: dict[str, str], already: str | None = None) -> str | None:
        REQUEST_ID.set(already)
        adopt_request_id(headers, max_chars=MAX)
        return REQUEST_ID.get()

    assert contextvars.copy_context().run(adopted, {"x-request-id": "entry-7"}) == "entry-7"
    assert contextvars.copy_context().run(adopted, {"x-request-id": "a b"}) is None  # not acceptable
    assert contextvars.copy_context().run(adopted, {"x-request-id": "x" * (MAX + 1)}) is None
    assert contextvars.copy_context().run(adopted, {}) is None
    assert contextvars.copy_context().run(adopted, {"x-request-id": "other"}, "mine") == "mine"


def test_a_forked_process_draws_its_own_id_prefix():
    import os

    from services.observability import new_id

    parent = new_id()
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its first id, to the parent
        os.write(write, new_id().encode())
        os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    child = os.read(read, 64).decode()
    os.close(read)
    assert len(child) == 32 and child[:16] != parent[:16]
