"""Train (--dry-run) -> export -> register -> serve -> request, all from scratch in temp dirs."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import httpx

from tests.conftest import ROOT, Server


def test_dry_run_artifact_is_served_end_to_end(tmp_path):
    home, out_dir = tmp_path / "bentoml", tmp_path / "artifact"
    env = {**os.environ, "BENTOML_HOME": str(home), "BENTOML_DO_NOT_TRACK": "true"}
    run = subprocess.run(
        [sys.executable, "-m", "training.train_sentiment", "--dry-run", "--out-dir", str(out_dir),
         "--threads", "1"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    tag = run.stdout.strip().splitlines()[-1].removeprefix("registered ")
    metadata = json.loads((out_dir / "metadata.json").read_text())
    assert tag == f"sentiment:{metadata['sha256'][:16]}"
    assert metadata["dry_run"] is True
    assert len(metadata["history"]) == 1
    assert json.loads((out_dir / "train_config.json").read_text())["dry_run"] is True

    server = Server(home, env={"RNNSERVE_SENTIMENT_MODEL": tag}, target="services.sentiment:Sentiment")
    server.start()
    try:
        with httpx.Client(base_url=server.url, timeout=60) as http:
            results = http.post("/classify", json={"texts": ["a fine film", "awful"]}).json()
            info = http.post("/info", json={}).json()
    finally:
        server.stop()
    assert [sorted(r["probabilities"]) for r in results] == [["negative", "positive"]] * 2
    assert info["version"] == tag.split(":")[1]
