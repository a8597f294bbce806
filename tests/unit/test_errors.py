"""One error type and its one serializer (services/errors.py): mapping, shape, logging."""

from __future__ import annotations

import json
import logging

import aiohttp
import pytest
from bentoml.exceptions import BadInput, BentoMLException, ServiceUnavailable
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from services.errors import (
    ClientErrorLog,
    ServiceError,
    encode,
    error_response,
    field_path,
    to_service_error,
)


class Texts(BaseModel):
    model_config = ConfigDict(extra="forbid")

    texts: list[str] = Field(max_length=2)


def validation_error() -> ValidationError:
    with pytest.raises(ValidationError) as raised:
        Texts.model_validate({"texts": ["a", "b", "c"], "typo": 1})
    return raised.value


def test_the_shape_is_error_code_message_field_and_detail():
    body, headers = encode(ServiceError(404, "session_not_found", "session x is unknown", "session_id"))
    assert json.loads(body) == {"error": {"code": "session_not_found", "message": "session x is unknown",
                                          "field": "session_id"}, "detail": []}
    assert (b"content-type", b"application/json") in headers
    assert not any(name == b"retry-after" for name, _ in headers)


@pytest.mark.parametrize("status", [429, 503, 504])
def test_retryable_statuses_carry_retry_after(status):
    _, headers = encode(ServiceError(status, "x", "y"))
    assert (b"retry-after", b"1") in headers


def test_pydantic_errors_keep_detail_and_name_the_first_field():
    error = to_service_error(validation_error())
    assert (error.status, error.field) == (400, "texts")
    assert "texts: List should have at most 2 items" in error.message
    assert [d["loc"] for d in error.detail] == [["texts"], ["typo"]]
    assert to_service_error(ValidationError.from_exception_data("X", [
        {"type": "extra_forbidden", "loc": ("typo",), "input": 1}])).code == "unknown_field"


def test_a_model_services_error_crosses_to_the_entry_with_its_code():
    """What the entry's BentoML client raises for a model service's ServiceError answer."""
    inner = ServiceError(429, "too_many_sessions", "10 sessions are open; the limit is 10")
    body, _ = encode(inner)
    raised = BentoMLException(body.decode(), error_code=429)
    crossed = to_service_error(raised)
    assert (crossed.status, crossed.code, crossed.message) == (429, "too_many_sessions", inner.message)


def test_dependency_failures_are_503_and_bugs_are_generic_500s():
    assert to_service_error(ServiceUnavailable("shed")).code == "model_unavailable"
    assert to_service_error(BentoMLException("slow", error_code=504)).status == 503
    assert to_service_error(aiohttp.ServerDisconnectedError()).code == "model_unavailable"
    assert to_service_error(TimeoutError()).status == 503
    bug = to_service_error(KeyError("/secret/path"))
    assert (bug.status, bug.code) == (500, "internal_error") and "secret" not in bug.message
    assert to_service_error(BentoMLException("Traceback /work/x.py")).code == "internal_error"


def test_bentomls_own_4xx_keep_their_status():
    error = to_service_error(BadInput("A file field was sent as a text value"))
    assert (error.status, error.code) == (400, "invalid_request")


def test_error_response_is_a_starlette_response_of_the_shape():
    response = error_response(ServiceError(503, "overloaded", "busy"))
    assert response.status_code == 503
    assert response.headers["retry-after"] == "1"
    assert json.loads(response.body)["error"]["code"] == "overloaded"


def test_field_path():
    assert field_path(["rows", 3, "high"]) == "rows[3].high"
    assert field_path([]) is None
    assert field_path([0, "x"]) == "[0].x"


def test_client_errors_are_logged_quoted_at_info_and_rate_limited(caplog):
    now = [0.0]
    log = ClientErrorLog(per_second=2, clock=lambda: now[0])
    forged = ServiceError(400, "unknown_field", 'Unknown field "a\\nERROR forged line"', "a\nERROR forged")
    with caplog.at_level(logging.INFO, logger="services.errors"):
        assert [log("POST", "/v1/x", forged) for _ in range(5)] == [True, True, False, False, False]
        now[0] = 1.5
        assert log("POST", "/v1/x", forged)
    lines = [r for r in caplog.records if r.name == "services.errors"]
    assert all(r.levelno == logging.INFO and r.exc_info is None for r in lines)
    assert all("\n" not in r.getMessage() for r in lines)
    assert "3 more unknown_field answers" in lines[-2].getMessage()


def test_server_faults_are_logged_at_error_with_the_traceback(caplog):
    try:
        raise KeyError("boom")
    except KeyError as exc:
        with caplog.at_level(logging.INFO, logger="services.errors"):
            ClientErrorLog()("POST", "/v1/x", ServiceError.internal(), exc)
    [record] = [r for r in caplog.records if r.name == "services.errors"]
    assert record.levelno == logging.ERROR and record.exc_info is not None
