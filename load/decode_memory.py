"""Peak memory of one entry worker while it decodes uploaded images (issue 13, finding 5).

    python -m load.decode_memory            # starts its own server with one entry worker

For each phase it starts a fresh ``bentoml serve services.api:Api`` with ``RNNSERVE_API_WORKERS=1`` on
a free loopback port (memory a worker freed stays in its heap, so phases must not share one), sends
the uploads at once and reads the entry worker's peak RSS (``VmHWM``, reset through
``/proc/<pid>/clear_refs`` just before). Phases: one 4096x4096 16-bit greyscale PNG (about 40 KB that
declares 32 MiB of pixels), 64 of them, 64 2048x2048 RGB PNGs and 64 4032x3024 JPEG photos.
Figures are printed; nothing is asserted. Linux only.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from services.local_server import ROOT, Server

MIB = 1 << 20


def png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, "PNG")
    return buffer.getvalue()


def grey16(side: int) -> bytes:
    """A ``side`` x ``side`` 16-bit greyscale PNG: a few stripes, so it compresses to kilobytes."""
    array = np.zeros((side, side), dtype=np.uint16)
    array[:, ::512] = 65535
    return png(array)


def rgb(side: int) -> bytes:
    ramp = np.linspace(0, 255, side, dtype=np.uint8)
    array = np.stack(np.broadcast_arrays(ramp[None, :], ramp[:, None], np.uint8(90)), axis=-1)
    return png(np.ascontiguousarray(array))


def photo(width: int, height: int) -> bytes:
    from training.scenes import make_scene

    buffer = io.BytesIO()
    picture = Image.fromarray(make_scene(0, "test_fresh").image)
    picture.resize((width, height), Image.Resampling.BICUBIC).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def children(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    found = [int(p) for p in out.split()]
    return found + [c for p in found for c in children(p)]


def entry_worker(server: Server) -> int:
    """The process that serves the entry service's API (not the Caption/Translate/Forecast ones)."""
    for pid in children(server.process.pid):
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        if "worker" in cmdline and "--service-name rnnserve " in cmdline:
            return pid
    tree = {p: Path(f"/proc/{p}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            for p in children(server.process.pid)}
    raise RuntimeError(f"no entry worker among {json.dumps(tree, indent=1)}")


def memory(pid: int) -> dict[str, int]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) * 1024
    return fields


def phase(home: Path, name: str, data: bytes, count: int) -> dict:
    server = Server(home, env={"RNNSERVE_API_WORKERS": "1"}).start()
    try:
        return measure(server, entry_worker(server), name, data, count)
    finally:
        server.stop()


def measure(server: Server, pid: int, name: str, data: bytes, count: int) -> dict:
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # peak RSS := current RSS
    before = memory(pid)["VmRSS"]

    def send(_: int) -> int:
        with httpx.Client(base_url=server.url, timeout=120) as http:
            files = {"image": ("image", data, "application/octet-stream")}
            return http.post("/v1/caption/upload", files=files).status_code

    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=count) as pool:
        statuses = Counter(pool.map(send, range(count)))
    seconds = time.perf_counter() - started
    after = memory(pid)
    result = {"phase": name, "requests": count, "file_bytes": len(data), "statuses": dict(statuses),
              "rss_before_mib": round(before / MIB), "peak_rss_mib": round(after["VmHWM"] / MIB),
              "peak_growth_mib": round((after["VmHWM"] - before) / MIB), "seconds": round(seconds, 1)}
    print(json.dumps(result), flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=int, default=64)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="decode-memory-") as home:
        env = {**os.environ, "BENTOML_HOME": home, "BENTOML_DO_NOT_TRACK": "true"}
        dirs = sorted(str(p) for p in (ROOT / "models" / "artifacts").iterdir() if (p / "model.pt").is_file())
        subprocess.run([sys.executable, "-m", "training.registry", *dirs], cwd=ROOT, env=env, check=True,
                       capture_output=True)
        print(json.dumps({"root": str(ROOT)}), flush=True)
        big, count = grey16(4096), args.concurrency
        phase(Path(home), "one 4096x4096 16-bit PNG", big, 1)
        phase(Path(home), f"{count} x 4096x4096 16-bit PNG", big, count)
        phase(Path(home), f"{count} x 2048x2048 RGB PNG", rgb(2048), count)
        phase(Path(home), f"{count} x 4032x3024 JPEG", photo(4032, 3024), count)


if __name__ == "__main__":
    main()
