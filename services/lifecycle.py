"""The life of a model service, declared once: load, verify, warm up, info, readiness, failure, drain.

Each model service subclasses ``ModelService`` where it is defined and passes
``model_service_config(...)`` to its own ``@bentoml.service``; nothing rewrites a service class from
outside, so ``bentoml serve services.translate:Translate`` behaves exactly as the same class composed
under the entry service.

- **Load and verify**: the model-store entry named by the class's ``bento_model`` is loaded on the
  service's device and checked against the sha256 recorded at registration (services/artifacts.py).
- **Warm up** before ready: the subclass's ``warm_up`` runs representative shapes; ``__is_ready__``
  answers True only after it.
- **A bad artifact** (missing, truncated, tampered) keeps only this model out: the worker stays up,
  logs the reason, sets ``rnnserve_model_load_failed{model}``, reports not ready, and every API
  answers 503 ``model_unavailable`` (the check runs before each call: services/bentoml_compat.py).
- **Drain**: on SIGTERM a model service keeps serving until no worker of the entry service is left
  under the same arbiter (or the wait runs out), so that the entry's requests in flight can finish.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import threading
import time
from typing import Any, ClassVar

import bentoml
import torch
from starlette.types import ASGIApp, Message, Receive, Scope, Send

import services.bentoml_compat  # BentoML patched (no URL fetches, one error shape) in every process
import services.observability  # request ids and the log format in every process
from services.artifacts import load_stored_model
from services.errors import ServiceError, encode, error_response, report, send_error
from services.inprocess import REGISTRY, InProcessModel
from services.schemas.common import ModelInfo
from services.settings import SETTINGS

logger = logging.getLogger(__name__)
ENTRY_SERVICE = "rnnserve"  # the entry service's name (services/api.py), whose workers drain first


def model_service_config(*, workers: int) -> dict[str, Any]:
    """The ``@bentoml.service`` options every model service shares."""
    return {
        "workers": workers,
        "traffic": {"timeout": SETTINGS.http.timeout_s},
        # BentoML 1.4.40's client in the entry replaces its aiohttp session every 100 requests (the
        # default runner_connection.max_requests) and closes the old one while requests are still in
        # flight on it: ServerDisconnectedError under load (bentoml/BentoML#5540, #5698). Calls go
        # over a local socket, so never recycling is safe.
        "runner_connection": {"max_requests": 2**31 - 1, "max_age": 1e9},
        # The entry logs every public request; a model service's internal calls are not logged again.
        **SETTINGS.observability(),
    }


def settle_heap() -> None:
    """Once a worker's models are loaded: collect, freeze what survives (the start-up's modules, model
    weights, BentoML's objects) out of every later collection, and collect young objects less often
    (SETTINGS.gc): with Python's default collector, each full collection of an entry worker's
    start-up objects paused its event loop for hundreds of milliseconds under load (load/RESULTS.md)."""
    if SETTINGS.gc == "default":
        return
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(SETTINGS.gc_gen0_threshold, older, oldest)


def lower_priority(niceness: int) -> None:
    """Runs this process at ``niceness`` at least (Unix; never raises a priority, which needs root)."""
    if niceness > os.getpriority(os.PRIO_PROCESS, 0):
        os.setpriority(os.PRIO_PROCESS, 0, niceness)


class ModelService:
    """Base of every model service: subclasses set ``name``, ``bento_model`` (a
    ``bentoml.models.BentoModel`` at class scope), ``threads`` and ``cpu_nice``, and implement ``setup`` and
    ``warm_up``."""

    name: ClassVar[str]
    bento_model: ClassVar[Any]
    threads: ClassVar[int] = 1
    cpu_nice: ClassVar[int] = 0  # the decoders' lower CPU priority (DecoderSettings.cpu_nice)

    def __init__(self) -> None:
        torch.set_num_threads(self.threads)
        lower_priority(self.cpu_nice)
        self.device = "cpu"  # until _load: a device that is not usable keeps only this model out
        self.model_info: ModelInfo | None = None
        defer_sigterm(ENTRY_SERVICE, SETTINGS.http.timeout_s + 5.0)
        self.loaded = InProcessModel(self.name, self._load)
        settle_heap()

    def _load(self) -> ModelService:
        self.device = SETTINGS.torch_device()
        model, metadata, self.model_info = load_stored_model(self.bento_model, self.device)
        self.setup(model, metadata)
        started = time.perf_counter()
        self.warm_up()
        logger.info("%s %s warmed up on %s in %.2f s", self.name, self.model_info.version, self.device,
                    time.perf_counter() - started)
        return self

    def setup(self, model: torch.jit.ScriptModule, metadata: dict[str, Any]) -> None:
        """Builds what the APIs use from the verified artifact."""
        raise NotImplementedError

    def warm_up(self) -> None:
        """Runs representative lengths and batch sizes once, before the service reports ready."""
        raise NotImplementedError

    def __is_ready__(self) -> bool:
        return self.loaded.ready

    def unavailable(self) -> ServiceError | None:
        """The answer to every call while the model is not loaded, else None."""
        if self.loaded.ready:
            return None
        return ServiceError.unavailable(f"Model {self.name} is not loaded (its artifact failed the checks "
                                        "at start; the log says why). Retry after a fixed artifact is "
                                        "deployed; /readyz names the models that are not ready.")

    @bentoml.api
    def info(self) -> ModelInfo:
        """Name, version, cell and held-out metrics of the loaded model."""
        return self.model_info


# Readiness of the entry ---------------------------------------------------------------------------


class Readyz:
    """``GET /readyz`` of the entry: BentoML's answer when ready, else a 503 naming the models that are
    not (a model in this worker that failed to load, a model service that does not answer ready)."""

    def __init__(self, app: ASGIApp, *, service: Any) -> None:
        self.app, self.service = app, service

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != "/readyz":
            await self.app(scope, receive, send)
            return
        status: list[int] = []
        messages: list[Message] = []

        async def capture(message: Message) -> None:
            if message["type"] == "http.response.start":
                status.append(message["status"])
            messages.append(message)

        try:
            await self.app(scope, receive, capture)
        except Exception as exc:  # BentoML's probe raises when a dependency refuses connections
            logger.warning("readiness probe failed: %s: %s", type(exc).__name__, exc)
        if status == [200]:
            for message in messages:
                await send(message)
            return
        readiness = await dependency_readiness(self.service)
        names = [name for name, ready in readiness.items() if not ready]
        message = (f"Not ready: {', '.join(names)} (its model failed to load, or it is starting or "
                   "restarting; the log says which)." if names else
                   "Not ready: the entry service is starting.")
        error = ServiceError(503, "not_ready", message, None,
                             [{"service": name, "ready": ready} for name, ready in readiness.items()])
        await send_error(send, error)


async def dependency_readiness(service: Any, timeout_s: float = 2.0) -> dict[str, bool]:
    """Each model this worker runs -> whether it loaded; each model service ``service`` depends on ->
    whether its /readyz answers 200."""
    from services.bentoml_compat import resolved_client

    local = {name: model.ready for name, model in REGISTRY.items()}
    names, checks = [], []
    for name, dependency in getattr(service, "dependencies", {}).items():
        client = resolved_client(dependency)  # the client the running service already uses, if any
        if client is None or not hasattr(client, "is_ready"):
            continue
        names.append(dependency.on.name if dependency.on is not None else name)
        checks.append(_is_ready(client, timeout_s))
    return {**local, **dict(zip(names, await asyncio.gather(*checks), strict=True))}


async def _is_ready(client: Any, timeout_s: float) -> bool:
    try:
        return bool(await asyncio.wait_for(client.is_ready(max(1, int(timeout_s))), timeout_s + 1))
    except Exception:  # connection refused while a worker restarts, timeouts, ...
        return False


# Shutdown order -----------------------------------------------------------------------------------


def defer_sigterm(entry_name: str, wait_s: float) -> bool:
    """Wraps this process's SIGTERM handler (uvicorn's) so that it runs once the entry is gone.

    BentoML's arbiter (circus) sends SIGTERM to every worker at once; the entry then finishes its
    requests in flight, which still need their model service. Kubernetes' terminationGracePeriodSeconds
    must exceed ``wait_s``. Served alone, no entry worker exists and shutdown starts at once.
    """
    if threading.current_thread() is not threading.main_thread():
        return False
    previous = signal.getsignal(signal.SIGTERM)
    if not callable(previous):
        return False

    def deferred(signum: int, frame: Any) -> None:
        def later() -> None:
            started = time.monotonic()
            while time.monotonic() - started < wait_s and entry_alive(entry_name):
                time.sleep(0.1)
            logger.info("SIGTERM: the entry service has stopped (%.1f s); shutting down gracefully",
                        time.monotonic() - started)
            previous(signum, None)

        threading.Thread(target=later, name="rnnserve-drain", daemon=True).start()

    signal.signal(signal.SIGTERM, deferred)
    return True


def entry_alive(entry_name: str) -> bool:
    """Whether a worker of the entry service still runs under this process's parent (the arbiter)."""
    import psutil

    from services.workers import service_name_of

    try:
        siblings = psutil.Process().parent().children()
    except (psutil.Error, AttributeError):
        return False
    for process in siblings:
        try:
            if process.status() != psutil.STATUS_ZOMBIE and service_name_of(process.cmdline()) == entry_name:
                return True
        except psutil.Error:
            continue
    return False


# Errors of every endpoint ---------------------------------------------------------------------------


def _before_call(instance: Any, request: Any) -> ServiceError | None:
    """The caller's request id for this call's log lines; the refusal of a model that is not loaded."""
    services.observability.adopt_request_id(request.headers, SETTINGS.http.max_request_id_chars)
    check = getattr(instance, "unavailable", None)
    return check() if check is not None else None


def _answer(request: Any, exc: BaseException) -> Any:
    return error_response(report(exc, request.method, request.url.path))


services.bentoml_compat.install_endpoint_handler(_before_call, _answer)


def _render(status: int, code: str, message: str) -> bytes:
    return encode(ServiceError(status, code, message))[0]


services.bentoml_compat.bound_connections(services.bentoml_compat.ConnectionLimits(
    header_timeout_s=SETTINGS.http.header_timeout_s, max_header_bytes=SETTINGS.http.max_header_bytes,
    keep_alive_s=SETTINGS.http.keep_alive_s, max_connections=SETTINGS.http.max_connections,
    retry_after_s=SETTINGS.http.retry_after_s, render=_render))
services.bentoml_compat.bound_dependency_connects(SETTINGS.http.connect_timeout_s,
                                                   SETTINGS.http.peer_timeout_s)
