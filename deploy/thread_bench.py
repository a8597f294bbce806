"""CPU threads per worker against workers, for the sentiment model; prints the figures behind the
defaults in deploy/k8s/base/config.env.

1. In process: sentences/s of the batched path (``services.sentiment.classify``) at batch 32 on SST-2
   dev sentences, with 1 and with 2 intra-op threads.
2. Served: req/s of the sentiment model service (``bentoml serve services.sentiment:Sentiment`` on
   127.0.0.1) under a bounded closed-loop load, with 1 worker x 2 threads against 2 workers x 1 thread.

    python deploy/thread_bench.py [--artifact models/artifacts/sentiment] [--seconds 20]

Figures depend on what else the machine runs; the script prints the load average with them.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "deploy"))

import torch  # noqa: E402
from probe import request  # noqa: E402

from load.harness import sentences  # noqa: E402
from models.text import Vocab  # noqa: E402
from services.artifacts import load_artifact  # noqa: E402
from services.sentiment import classify  # noqa: E402


def in_process(artifact: Path, threads: int, batch_size: int, seconds: float) -> float:
    torch.set_num_threads(threads)
    model, metadata = load_artifact(artifact)
    vocab, labels = Vocab(metadata["vocab"]), list(metadata["labels"])
    texts = sentences()[:512]
    batches = [texts[i:i + batch_size] for i in range(0, len(texts), batch_size)]
    for batch in batches[:2]:
        classify(model, vocab, labels, batch)
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        for batch in batches:
            done += len(classify(model, vocab, labels, batch))
    return done / (time.perf_counter() - started)


def served(artifact: Path, workers: int, threads: int, seconds: float, concurrency: int) -> float:
    port = int(subprocess.check_output([sys.executable, "-c", "import socket; s = socket.socket(); "
                                        "s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])"]))
    with tempfile.TemporaryDirectory() as home:
        env = {**os.environ, "BENTOML_HOME": home, "BENTOML_DO_NOT_TRACK": "true",
               "RNNSERVE_SENTIMENT_WORKERS": str(workers), "RNNSERVE_SENTIMENT_THREADS": str(threads),
               "RNNSERVE_DEVICE": "cpu"}
        subprocess.run([sys.executable, "-m", "training.registry", str(artifact)], cwd=ROOT, env=env,
                       check=True, capture_output=True)
        log = open(Path(home) / "serve.log", "w")  # noqa: SIM115
        process = subprocess.Popen([sys.executable, "-m", "bentoml", "serve", "services.sentiment:Sentiment",
                                    "--host", "127.0.0.1", "--port", str(port)], cwd=ROOT, env=env,
                                   stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            base = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 300
            while True:
                try:
                    if request(base + "/readyz", timeout=2)[0] == 200:
                        break
                except OSError:
                    pass
                if time.monotonic() > deadline or process.poll() is not None:
                    raise RuntimeError((Path(home) / "serve.log").read_text()[-3000:])
                time.sleep(0.5)
            texts = sentences()[:64]
            stop = time.monotonic() + seconds

            def worker(index: int) -> int:
                ok = 0
                while time.monotonic() < stop and ok < 10_000:
                    # 1 to 4 sentences per request, so requests differ in size like real traffic.
                    body = {"texts": texts[index % 60:index % 60 + 1 + index % 4]}
                    ok += request(base + "/classify", body)[0] == 200
                return ok

            started = time.monotonic()
            with ThreadPoolExecutor(concurrency) as pool:
                ok = sum(pool.map(worker, range(concurrency)))
            return ok / (time.monotonic() - started)
        finally:
            os.killpg(process.pid, 15)
            process.wait(timeout=60)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--artifact", type=Path, default=ROOT / "models" / "artifacts" / "sentiment")
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    print(f"cpus {os.cpu_count()}, load average {os.getloadavg()[0]:.1f}, torch {torch.__version__}")
    for threads in (1, 2):
        rate = in_process(args.artifact, threads, args.batch_size, args.seconds / 2)
        print(f"in process, batch {args.batch_size}, {threads} thread(s): {rate:.0f} sentences/s")
    for workers, threads in ((1, 1), (1, 2), (2, 1)):
        rate = served(args.artifact, workers, threads, args.seconds, args.concurrency)
        print(f"served, {workers} worker(s) x {threads} thread(s), concurrency {args.concurrency}: "
              f"{rate:.0f} req/s (load average {os.getloadavg()[0]:.1f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
