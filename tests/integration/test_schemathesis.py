"""Property-based API tests: schemathesis over every operation of the live service's own /docs.json.

Each operation gets a bounded number of generated requests (SCHEMATHESIS_MAX_EXAMPLES, default 25), valid
ones (positive) and schema-violating ones (negative), checked with ``not_a_server_error`` (no 5xx,
ever) and ``response_schema_conformance`` (every answer, errors included, matches the document).
Operations are read from the served document at run time, so new endpoints are covered without
touching this file. Shrinking is off to keep the run bounded; a failure prints the failing request
as a curl command.

schemathesis' own pytest loader (``from_fixture``) does not work with pytest 9, so the operations
are driven here with their hypothesis strategies, one bounded run per operation and mode.
"""

from __future__ import annotations

import os

import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import response_schema_conformance

MAX_EXAMPLES = int(os.environ.get("SCHEMATHESIS_MAX_EXAMPLES", "25"))
CHECKS = [not_a_server_error, response_schema_conformance]
MODES = (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)


def run_operation(operation, mode: GenerationMode, base_url: str) -> int:
    """Runs one bounded hypothesis search on ``operation``; returns the number of calls made."""
    calls = 0

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True, database=None,
              phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
    def search(case) -> None:
        nonlocal calls
        calls += 1
        case.call_and_validate(base_url=base_url, checks=CHECKS, timeout=60)

    search()
    return calls


def test_every_operation_answers_within_its_schema_and_never_5xx(server):
    schema = schemathesis.openapi.from_url(f"{server.url}/docs.json")
    failures: dict[str, str] = {}
    calls: dict[str, int] = {}
    for result in schema.get_all_operations():
        operation = result.ok()
        for mode in MODES:
            name = f"{operation.method.upper()} {operation.path} [{mode.value}]"
            try:
                calls[name] = run_operation(operation, mode, server.url)
            except Unsatisfiable:  # nothing to make invalid: a GET probe without parameters
                assert mode is GenerationMode.NEGATIVE, name
            except (Exception, BaseExceptionGroup) as exc:  # keep going, report every failure at the end
                failures[name] = str(exc)[:3000]
    print("\n".join(f"{name}: {count} calls" for name, count in sorted(calls.items())))
    assert any(name.startswith("POST /v1/sentiment ") for name in calls), "sentiment was not exercised"
    assert not failures, "\n\n".join(f"{name}\n{text}" for name, text in failures.items())


def test_the_document_lists_every_api_route(client):
    """The property test covers what /docs.json lists; make sure that is every route of the service."""
    from services.api import Api

    paths = set(client.get("/docs.json").json()["paths"])
    assert {api.route for api in Api.apis.values()} <= paths
