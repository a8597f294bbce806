"""Forecast data handling and training: chronological split without leakage, conformal calibration,
and a ``--dry-run`` on a synthetic Yahoo CSV that exports, reloads and records what serving needs."""

from __future__ import annotations

import datetime as dt
import json

import numpy as np
import pytest

from models.artifact import load_artifact
from training.forecast_data import (
    chronological_split,
    feature_matrix,
    horizon_targets,
    months_before,
    origins,
    read_yahoo_csv,
)
from training.train_forecast import conformal_offset, main

WINDOW, HORIZONS = 20, 5


def write_csv(path, days: int = 900, seed: int = 0):
    """A geometric random walk on business days, in Yahoo's column layout."""
    rng = np.random.default_rng(seed)
    close = 50 * np.exp(np.cumsum(rng.normal(0.0005, 0.02, days)))
    open_ = close * np.exp(rng.normal(0, 0.005, days))
    dates = np.busday_offset(np.datetime64("2020-01-01"), np.arange(days), roll="forward")
    lines = ["Date,Open,High,Low,Close,Adj Close,Volume"]
    for d, o, c in zip(dates, open_, close, strict=True):
        high, low = max(o, c) * 1.01, min(o, c) * 0.99
        lines.append(f"{d},{o:.6f},{high:.6f},{low:.6f},{c:.6f},{c:.6f},{rng.integers(1e6, 5e6)}")
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def csv_path(tmp_path_factory):
    return write_csv(tmp_path_factory.mktemp("stock") / "SYN.csv")


def test_split_is_chronological_with_a_full_last_year_of_test(csv_path):
    bars = read_yahoo_csv(csv_path)
    split = chronological_split(bars, val_months=6, test_months=12)
    assert 0 < split.val_start < split.test_start < len(bars)
    assert bars.dates[split.test_start] >= months_before(bars.dates[-1], 12)
    first_test = dt.date.fromisoformat(bars.dates[split.test_start])
    assert (dt.date.fromisoformat(bars.dates[-1]) - first_test).days >= 364


def test_every_target_of_a_sample_lies_in_its_period(csv_path):
    bars = read_yahoo_csv(csv_path)
    split = chronological_split(bars, val_months=6, test_months=12)
    train = origins(split, len(bars), WINDOW, HORIZONS, "train")
    val = origins(split, len(bars), WINDOW, HORIZONS, "validation")
    test = origins(split, len(bars), WINDOW, HORIZONS, "test")
    assert (train + HORIZONS < split.val_start).all()
    assert (val + 1 >= split.val_start).all() and (val + HORIZONS < split.test_start).all()
    assert (test + 1 >= split.test_start).all() and test[-1] == len(bars) - 2
    assert (train - WINDOW + 1 >= 1).all(), "windows never read the undefined feature of bar 0"
    targets = horizon_targets(bars.close, test, HORIZONS)
    assert np.isnan(targets[-1, 1:]).all() and not np.isnan(targets[:-4]).any()
    np.testing.assert_allclose(targets[0, 2], np.log(bars.close[test[0] + 3] / bars.close[test[0]]))


def test_features_are_scale_free(csv_path):
    bars = read_yahoo_csv(csv_path)
    features = feature_matrix(bars)
    assert np.isnan(features[0]).all() and np.isfinite(features[1:]).all()
    scaled = bars.__class__(bars.dates, bars.open * 7, bars.high * 7, bars.low * 7, bars.close * 7,
                            bars.volume)
    np.testing.assert_allclose(feature_matrix(scaled)[1:], features[1:], atol=1e-5)


def test_reader_rejects_unordered_or_non_positive_rows(tmp_path, csv_path):
    lines = csv_path.read_text().splitlines()
    swapped = tmp_path / "swapped.csv"
    swapped.write_text("\n".join([lines[0], lines[2], lines[1], *lines[3:]]) + "\n")
    with pytest.raises(ValueError, match="not strictly increasing"):
        read_yahoo_csv(swapped)
    cells = lines[5].split(",")
    cells[4] = "0"
    zero = tmp_path / "zero.csv"
    zero.write_text("\n".join([*lines[:5], ",".join(cells), *lines[6:]]) + "\n")
    with pytest.raises(ValueError, match="finite and positive"):
        read_yahoo_csv(zero)


def test_conformal_offset_reaches_the_nominal_coverage_on_its_data():
    rng = np.random.default_rng(1)
    target = rng.normal(0, 2.0, 500)
    lower, upper = np.full(500, -1.0), np.full(500, 1.0)  # far too narrow: ~38% coverage
    offset = conformal_offset(lower, upper, target, 0.8)
    assert offset > 0
    covered = np.mean((target >= lower - offset) & (target <= upper + offset))
    assert 0.8 <= covered <= 0.82


def test_dry_run_exports_a_reloadable_artifact_with_serving_metadata(tmp_path, csv_path):
    out = tmp_path / "artifact"
    metadata = main(["--csv-path", str(csv_path), "--out-dir", str(out), "--register", "false",
                     "--dry-run", "--window", str(WINDOW), "--val-months", "6", "--hidden-size", "8",
                     "--cell", "lstm"])
    for key in ("task", "cell", "metrics", "window", "horizons", "quantiles", "interval",
                "normalisation", "calibration", "split", "data", "state_shape", "sha256"):
        assert key in metadata, key
    assert metadata["normalisation"]["fitted_on"] == "train"
    assert metadata["data"]["csv"]["sha256"] and metadata["state_shape"] == [2, 8]
    assert 0 <= metadata["metrics"]["test_h1_coverage"] <= 1
    model, embedded = load_artifact(out)
    assert embedded["window"] == WINDOW and embedded["cell"] == "lstm"
    assert json.loads((out / "train_config.json").read_text())["dry_run"] is True
    assert model.initial_state(3).shape == (2, 3, 8)
