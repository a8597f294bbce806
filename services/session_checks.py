"""Whether an imported session state is one the loaded forecast model could have reached.

An exported state goes through clients' hands, so ``/v1/forecast/sessions/import`` trusts none of it
(issue 13, finding 11: 1e39 became nulls, 1e30 stepped to a forecast of nulls, a forged ``next`` was
echoed). The schema (``SessionState``) checks what needs no model: values finite in float32,
``bars_seen`` within the bar date range, dates. This checks the rest against the model: its version
and shape, the range its recurrence keeps the state in, and that ``next`` is what a step after
``last_bar`` answers. Values a model could reach pass; a plausible forgery within them still steps like
a real state and harms no one else.
"""

from __future__ import annotations

import itertools
import math

import numpy as np

from services.forecasting import ModelSpec, business_dates
from services.schemas.forecast import Bar, DayForecast, SessionState

# A GRU's or tanh RNN's state, and an LSTM's h, stay within [-1, 1]; float32 rounding may pass 1 by
# an ulp. An LSTM's cell grows by less than 1 per bar: |c| <= bars seen.
STATE_SLACK = 1e-5


def check_state(spec: ModelSpec, cell: str, exported: SessionState) -> str | None:
    """Why ``exported`` cannot be a state of the model ``spec`` describes (a ``cell``), or None."""
    if exported.model_version != spec.version:
        return (f"state was exported from model version {exported.model_version}; this server runs "
                f"{spec.version}. Create a new session with history instead")
    if tuple(exported.state_shape) != tuple(spec.state_shape):
        return (f"state_shape {exported.state_shape} does not match the model's "
                f"{list(spec.state_shape)}")
    layers, hidden = spec.state_shape
    if len(exported.state) != layers * hidden:
        return (f"state has {len(exported.state)} values; state_shape {layers}x{hidden} needs "
                f"{layers * hidden}")
    values = np.asarray(exported.state, dtype=np.float64).reshape(layers, hidden)
    if not np.isfinite(values.astype(np.float32)).all():
        return "state holds NaN or infinite values (in float32)"
    if (exported.bars_seen >= 1) != (exported.last_bar is not None):
        return "last_bar must be set exactly when bars_seen >= 1"
    h_rows = layers // 2 if cell == "lstm" else layers  # an LSTM stacks h over c
    bounds = [(values[:h_rows], 1.0, "a hidden state (h)")]
    if cell == "lstm":
        bounds.append((values[h_rows:], max(1.0, float(exported.bars_seen)),
                       f"an LSTM cell after {exported.bars_seen} bars"))
    for rows, limit, what in bounds:
        if rows.size and (peak := float(np.abs(rows).max())) > limit + STATE_SLACK:
            return (f"state holds {peak:g}; {what} of this {cell} model stays within "
                    f"[-{limit:g}, {limit:g}]")
    if (exported.bars_seen >= 2) != (exported.next is not None):
        return "next must be set exactly when bars_seen >= 2"
    if exported.next is not None:
        return check_next(spec, exported.last_bar, exported.next)
    return None


def check_next(spec: ModelSpec, last: Bar, forecast: DayForecast) -> str | None:
    """Whether ``forecast`` is the shape of what a step after ``last`` answers."""
    try:
        expected_date = business_dates(last.date, 1)[0]
    except ValueError as exc:
        return f"last_bar: {exc}"
    if forecast.horizon != 1 or forecast.date != expected_date:
        return (f"next must be horizon 1 on {expected_date} (the business day after last_bar "
                f"{last.date}); got horizon {forecast.horizon} on {forecast.date}")
    levels = [str(q) for q in spec.quantiles]
    if sorted(forecast.quantiles) != sorted(levels):
        return f"next.quantiles must have exactly the levels {levels}"
    prices = [forecast.quantiles[k] for k in levels]
    if not all(math.isfinite(p) and p > 0 for p in prices):
        return f"next.quantiles must be positive and finite prices; got {prices}"
    if any(b < a for a, b in itertools.pairwise(prices)):
        return "next.quantiles must not decrease with the level"
    lo, hi = (str(q) for q in spec.interval)
    expected = (forecast.quantiles[lo], forecast.quantiles["0.5"], forecast.quantiles[hi])
    if (forecast.lower, forecast.point, forecast.upper) != expected:
        return f"next.lower/point/upper must be its quantiles {lo}, 0.5 and {hi}"
    # Prices are computed in float32 (a relative error of ~1e-7), so allow a little more than that.
    if not math.isclose(forecast.log_return, math.log(forecast.point / last.close), rel_tol=1e-6,
                        abs_tol=1e-6):
        return "next.log_return must be log(next.point / last_bar.close)"
    return None
