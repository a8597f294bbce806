"""The model-service skeleton (services/lifecycle.py) and the served OpenAPI document."""

from __future__ import annotations

import signal
import threading
from typing import ClassVar

from services.lifecycle import ModelService, defer_sigterm, entry_alive
from services.openapi import openapi30, patch_openapi


def test_deferred_sigterm_runs_the_previous_handler_once_no_entry_is_left():
    assert not entry_alive("no-such-entry-service")
    called = threading.Event()
    original = signal.signal(signal.SIGTERM, lambda signum, frame: called.set())
    try:
        assert defer_sigterm("no-such-entry-service", wait_s=30)
        handler = signal.getsignal(signal.SIGTERM)
        handler(signal.SIGTERM, None)  # what the arbiter's SIGTERM would do
        assert called.wait(timeout=30)
    finally:
        signal.signal(signal.SIGTERM, original)


def test_a_service_whose_artifact_fails_stays_up_not_ready_and_refuses_every_call(tmp_path):
    """A model-store entry whose file does not match its recorded sha256 (the checks of
    services/artifacts.py): the service is built, reports not ready, and answers 503."""
    from services.artifacts import ArtifactError

    class Stored:  # the parts of bentoml.models.BentoModel that load_stored_model reads
        path = str(tmp_path)

        class info:  # noqa: N801 - the attribute BentoML's model exposes
            metadata: ClassVar[dict] = {"sha256": "0" * 64}

    class Broken(ModelService):
        name = "broken_unit_test"
        bento_model = Stored()

        def setup(self, model, metadata):  # pragma: no cover - never reached
            raise AssertionError("setup ran on a bad artifact")

    service = Broken()
    assert not service.__is_ready__()
    error = service.unavailable()
    assert (error.status, error.code) == (503, "model_unavailable")
    assert "broken_unit_test" in error.message
    assert issubclass(ArtifactError, RuntimeError)


def test_openapi30_turns_pydantic_schema_into_the_3_0_dialect():
    schema = {"properties": {
        "p": {"anyOf": [{"type": "number", "maximum": 1}, {"type": "null"}], "default": None},
        "ref": {"anyOf": [{"$ref": "#/components/schemas/Bar"}, {"type": "null"}]},
        "price": {"type": "number", "exclusiveMinimum": 0},
        "kind": {"const": "done"},
        "items": {"type": "array", "items": {"anyOf": [{"type": "string"}, {"type": "integer"}]}},
    }}
    out = openapi30(schema)["properties"]
    assert out["p"] == {"type": "number", "maximum": 1, "default": None, "nullable": True}
    assert out["ref"] == {"allOf": [{"$ref": "#/components/schemas/Bar"}], "nullable": True}
    assert out["price"] == {"type": "number", "minimum": 0, "exclusiveMinimum": True}
    assert out["kind"] == {"enum": ["done"]}
    assert out["items"]["items"] == {"anyOf": [{"type": "string"}, {"type": "integer"}]}


def test_patch_openapi_documents_the_error_shape_and_statuses():
    spec = {"paths": {"/v1/forecast/sessions": {"post": {"responses": {}}},
                      "/v1/caption": {"post": {"responses": {}}},
                      "/readyz": {"get": {"responses": {"200": {}}}}},
            "components": {"schemas": {"InvalidArgument": {"description": "Bad"}}}}
    out = patch_openapi(spec, prefix="/v1/", token_paths=("/v1/forecast/sessions",), token_enabled=True,
                        max_body_bytes=1000, body_limits={"/v1/caption": 5000})
    assert out["components"]["schemas"]["InvalidArgument"]["required"] == ["error", "detail"]
    sessions = out["paths"]["/v1/forecast/sessions"]["post"]["responses"]
    assert {"400", "401", "413", "415", "429", "503"} <= set(sessions)
    assert "Retry-After" in sessions["503"]["headers"]
    assert "5,000 bytes" in out["paths"]["/v1/caption"]["post"]["responses"]["413"]["description"]
    assert "401" not in out["paths"]["/v1/caption"]["post"]["responses"]
    assert out["paths"]["/readyz"] == spec["paths"]["/readyz"]


def test_settle_heap_freezes_the_start_up_and_spaces_young_collections_unless_default(monkeypatch):
    import gc

    from services import lifecycle
    from services.settings import Settings

    gc.unfreeze()  # a service built by another test settled this process's heap already
    before = gc.get_threshold()
    try:
        monkeypatch.setattr(lifecycle, "SETTINGS", Settings.from_env({"RNNSERVE_GC": "default"}))
        lifecycle.settle_heap()
        assert gc.get_freeze_count() == 0 and gc.get_threshold() == before
        monkeypatch.setattr(lifecycle, "SETTINGS", Settings.from_env({"RNNSERVE_GC_GEN0_THRESHOLD": "20000"}))
        survivor = [object()]  # alive at start-up: frozen
        lifecycle.settle_heap()
        assert gc.get_freeze_count() > 0 and gc.is_tracked(survivor)
        assert gc.get_threshold() == (20000, before[1], before[2])
        assert all(item is not survivor for item in gc.get_objects())  # no collection scans it again
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)


def test_a_decoder_service_runs_at_its_cpu_niceness_and_never_raises_a_priority():
    import subprocess
    import sys

    code = ("import os; from services.lifecycle import lower_priority; "
            "base = os.getpriority(os.PRIO_PROCESS, 0); lower_priority(min(19, base + 3)); "
            "a = os.getpriority(os.PRIO_PROCESS, 0); lower_priority(base);"
            "print(a - base, os.getpriority(os.PRIO_PROCESS, 0) - base, base)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    raised, kept, base = map(int, done.stdout.split())
    assert raised == kept == min(3, 19 - base)
    from services.settings import Settings

    settings = Settings.from_env({"RNNSERVE_TRANSLATE_CPU_NICE": "19"})
    assert settings.translate.cpu_nice == 19 and settings.caption.cpu_nice == 5
    assert not hasattr(settings.forecast, "cpu_nice")  # the cheap models keep the entry's priority
    from services.caption import Caption
    from services.forecast import Forecast
    from services.settings import SETTINGS
    from services.translate import Translate

    assert (Translate.inner.cpu_nice, Caption.inner.cpu_nice, Forecast.inner.cpu_nice) == (
        SETTINGS.translate.cpu_nice, SETTINGS.caption.cpu_nice, 0)
