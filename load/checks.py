"""Response checks shared by the Locust users whose endpoints answer ``{"results": [...]}``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def check_results(response, expected: int, valid: Callable[[dict[str, Any]], bool], problem: str) -> None:
    """Marks ``response`` failed unless it is a 200 with ``expected`` results that are all ``valid``."""
    if response.status_code != 200:
        response.failure(f"status {response.status_code}: {response.text[:200]}")
        return
    results = response.json().get("results", [])
    if len(results) != expected:
        response.failure(f"{len(results)} results for {expected} texts")
    elif not all(valid(r) for r in results):
        response.failure(f"{problem}: {results[0]}")
    else:
        response.success()
