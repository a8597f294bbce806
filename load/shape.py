"""Step load: users rise in equal steps to ``--users`` over ``--run-time``, then the test stops.

Selected by adding this file to the locustfiles (``python -m load.run --shape step`` does it):

    locust --config load/locust.conf -f load/locustfile.py,load/shape.py --users 64 --run-time 60s --steps 4

runs 16, 32, 48 and 64 users for 15 s each. Each step shows where throughput stops growing and latency
starts to (the charts of ``load/report.py`` plot users with throughput).
"""

from __future__ import annotations

from locust import LoadTestShape


class StepLoadShape(LoadTestShape):
    """``--steps`` equal steps up to ``--users``; ``--run-time`` split evenly between them."""

    use_common_options = True  # reads --users, --spawn-rate and --run-time instead of ignoring them

    def tick(self) -> tuple[int, float] | None:
        options = self.runner.environment.parsed_options
        steps = max(1, getattr(options, "steps", 4))
        total = options.run_time or 60
        step_seconds = total / steps
        elapsed = self.get_run_time()
        if elapsed >= total:
            return None
        step = min(steps, int(elapsed // step_seconds) + 1)
        users = max(1, round(options.num_users * step / steps))
        return users, float(options.spawn_rate or users)
