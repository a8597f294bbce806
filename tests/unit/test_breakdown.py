"""load/breakdown.py: py-spy stacks to stages, and stages to CPU per request."""

from __future__ import annotations

from collections import Counter

import pytest

from load.breakdown import OTHER, STAGE_NAMES, parse, split_ms, stage_of, table

PROCESS = 'process 31449:"python -m bentoml serve services.api:Api";process 31752:"python -m worker"'
LOOP = ("Server.run (uvicorn/server.py:86);asyncio_run (uvicorn/_compat.py:30);"
        "Runner.run (asyncio/runners.py:118)")
FORWARD = ("_WorkItem.run (concurrent/futures/thread.py:58);classify (services/sentiment.py:84);"
           "predict (services/sentiment.py:54);Module._call_impl (torch/nn/modules/module.py:1789)")
VALIDATE = ("Body.__call__ (services/admission.py:206);FastRoutes.__call__ (services/fast_routes.py:53);"
            "register.<locals>.handler (services/fast_routes.py:34);"
            "BaseModel.model_validate_json (pydantic/main.py:1)")
METRICS = ("Batcher._observe (services/inprocess.py:219);"
           "MetricWrapperBase.labels (prometheus_client/metrics.py:1)")
SEND = ("RequestId.__call__.<locals>.send_with_id (services/observability.py:72);"
        "RequestResponseCycle.send (uvicorn/protocols/http/httptools_impl.py:524)")
RAW = f"""{PROCESS};{LOOP} 40
{PROCESS};{FORWARD} 30
{PROCESS};{VALIDATE} 10
{PROCESS};{METRICS} 5
{PROCESS};{SEND} 10
{PROCESS};mystery (somewhere.py:1) 5
"""


@pytest.mark.parametrize(("stack", "stage"), [
    (LOOP, "event loop, sockets and HTTP parsing (C)"),
    (FORWARD, "model (forward)"),
    (VALIDATE, "validation"),  # innermost frame decides: pydantic under a middleware
    (METRICS, "metrics"),
    (SEND, "HTTP protocol (uvicorn, Python)"),
    ("RequestId.__call__ (services/observability.py:64);new_id (services/observability.py:50);"
     "uuid4 (uuid.py:723)", "middleware"),
    ("mystery (somewhere.py:1)", OTHER),
])
def test_a_stack_belongs_to_the_stage_of_its_innermost_known_frame(stack, stage):
    assert stage_of(f"{PROCESS};{stack}".split(";")) == stage


def test_parse_counts_samples_per_stage_and_the_split_adds_up_to_the_measured_cpu():
    samples = parse(RAW + "not a stack line\n")
    assert sum(samples.values()) == 100 and samples["model (forward)"] == 30 and samples[OTHER] == 5
    split = split_ms(samples, 2.0)
    assert set(split) == set(STAGE_NAMES)
    assert split["model (forward)"] == pytest.approx(0.6) and sum(split.values()) == pytest.approx(2.0)
    assert split_ms(Counter(), 2.0) == {}


def test_table_has_a_row_per_stage_and_the_measured_totals():
    text = table({"before": (parse(RAW), 2.0), "after": (Counter({"model (forward)": 1}), 1.0)})
    lines = text.splitlines()
    assert len(lines) == 2 + len(STAGE_NAMES) + 1
    assert "| model (forward) | 0.600 | 30% | 1.000 | 100% |" in lines
    assert lines[-1] == "| **total (measured)** | **2.000** | 100 samples | **1.000** | 1 samples |"


def test_the_rules_list_every_stage_with_its_patterns():
    from load.breakdown import STAGES, rules

    lines = rules().splitlines()
    assert [line.split(":")[0] for line in lines] == [f"- {name}" for name, _ in STAGES]
    assert "`prometheus_client/`" in lines[[name for name, _ in STAGES].index("metrics")]
