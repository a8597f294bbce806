"""The one Locust user of ``python -m load.locust_bench``: a closed loop on one endpoint, wait 0.

Run only by ``load/locust_bench.py`` (``locust -f load/locust_bench_users.py``) in Locust's own
process, since gevent patches sockets at import. Its name does not end in ``_locust.py``, so
``load/locustfile.py`` does not pick it up. Configured through the environment:

- ``LOCUST_BENCH_ENDPOINT``: ``sentiment`` (the 872 SST-2 dev sentences as ``{"text": ...}``, in order,
  round and round), ``forecast`` (``services.schemas.forecast.FORECAST_EXAMPLE``) or ``forecast-columns``
  (the same bars in the columnar form).
- ``LOCUST_BENCH_PATH``: the request path (default: the project's route, ``/v1/<endpoint>``), so a peer
  server that takes the same JSON body under another path (TorchServe's ``/predictions/<model>``) is
  measured with the same requests.

Bodies are encoded once, and answers are checked for status 200 only: parsing them would add client CPU
to the measurement, and a peer's answer shape differs. A failure's message is ``status <code>`` (or
``no answer: <error>``), which ``load/locust_bench.py`` reads back from Locust's failures CSV.
"""

from __future__ import annotations

import itertools
import json
import os
import sys
from pathlib import Path

from locust import FastHttpUser, constant, task

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:  # `locust -f load/locust_bench_users.py` from anywhere imports load.*
    sys.path.insert(0, str(HERE.parent))

from load.locust_bench import request_bodies, route_of  # noqa: E402 - after the sys.path line above

ENDPOINT = os.environ.get("LOCUST_BENCH_ENDPOINT", "sentiment")
PATH = os.environ.get("LOCUST_BENCH_PATH") or route_of(ENDPOINT)
BODIES = [json.dumps(body).encode() for body in request_bodies(ENDPOINT)]
RING = itertools.cycle(BODIES)
HEADERS = {"Content-Type": "application/json"}


class BenchUser(FastHttpUser):
    wait_time = constant(0)

    @task
    def post(self) -> None:
        with self.client.post(PATH, data=next(RING), headers=HEADERS, name=PATH,
                              catch_response=True) as response:
            if response.status_code == 200:
                response.success()
            elif response.status_code:
                response.failure(f"status {response.status_code}")
            else:
                response.failure(f"no answer: {type(response.error).__name__}")
