"""The processes of a running ``bentoml serve``, told apart by their command lines.

``bentoml serve`` is an arbiter (circus) that starts every worker of every service as a process
whose arguments include ``--service-name NAME`` (and ``--worker-id N``). That flag is the only way
to tell from outside which service a process serves, so it is read in one place,
``service_name_of``. The rest are views of one server's process tree for the load tools and tests:
labels, a worker's pid, resident memory and CPU seconds.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Sequence

import psutil

SERVICE_NAME_FLAG = "--service-name"
WORKER_ID_FLAG = "--worker-id"
ARBITER = "arbiter"


def _flag_value(args: Sequence[str], flag: str) -> str | None:
    for index, arg in enumerate(args):
        if arg == flag and index + 1 < len(args):
            return args[index + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return None


def service_name_of(args: Sequence[str]) -> str | None:
    """The BentoML service a worker process serves, from its command line; None for any other process."""
    return _flag_value(args, SERVICE_NAME_FLAG)


def process_label(process: psutil.Process) -> str:
    """``NAME#WORKER`` for a service's worker, ``arbiter`` for ``bentoml serve`` itself."""
    try:
        args = process.cmdline()
    except psutil.Error:
        return "gone"
    name = service_name_of(args)
    if name is not None:
        return f"{name}#{_flag_value(args, WORKER_ID_FLAG) or '1'}"
    if "serve" in args:
        return ARBITER
    return " ".join(args[:3])[:40]


def server_processes(root_pid: int) -> dict[str, psutil.Process]:
    """Every process of the server under ``root_pid`` (its ``bentoml serve``), by ``process_label``."""
    root = psutil.Process(root_pid)
    processes = {ARBITER: root}
    for child in root.children(recursive=True):
        processes[process_label(child)] = child
    return processes


def worker_pid(root_pid: int, service: str) -> int:
    """The pid of a worker of ``service`` under the server ``root_pid``; LookupError when none runs."""
    for name, process in server_processes(root_pid).items():
        if name.split("#")[0] == service:
            return process.pid
    raise LookupError(f"no worker of service {service!r} under pid {root_pid}")


def rss_mib(root_pid: int) -> dict[str, float]:
    """Resident memory of every process of the server, in MiB, by label."""
    out = {}
    for name, process in server_processes(root_pid).items():
        try:
            out[name] = round(process.memory_info().rss / 2**20, 1)
        except psutil.Error:
            continue
    return dict(sorted(out.items()))


def cpu_seconds_by_service(root_pid: int) -> dict[str, float]:
    """CPU seconds so far of the server's processes, summed by service name (``arbiter``: the rest)."""
    out: Counter = Counter()
    with contextlib.suppress(psutil.Error):
        root = psutil.Process(root_pid)
        for process in [root, *root.children(recursive=True)]:
            with contextlib.suppress(psutil.Error):
                name = service_name_of(process.cmdline()) or ARBITER
                times = process.cpu_times()
                out[name] += times.user + times.system
    return dict(out)
