"""The one module that touches BentoML's private API; the rest of ``services/`` calls what it exports.

BentoML is pinned exactly (pyproject.toml, constraints.txt) because the code below relies on modules,
attributes and signatures that BentoML does not promise to keep. tests/unit/test_bentoml_compat.py
checks every one of them, and names the one that changed, so an upgrade is a change of this module
and of the pin together, never a surprise in production.

Two kinds of use:

* Patches, applied once at import by every service module that needs them (each is idempotent): no
  request ever makes the server fetch a URL (``refuse_remote_inputs``, SECURITY.md), and per-request
  overhead found by profiling (load/RESULTS.md) is removed (``cache_response_media_types``,
  ``cache_bound_api_functions``). The performance patches keep BentoML's behaviour, only not
  recomputing what cannot change between requests; the security patch removes a behaviour on purpose.
* Accessors for BentoML internals that the entry worker reuses (services/inprocess.py, errors.py):
  its adaptive batcher, its metrics client and server context, a dependency's resolved client.
"""

from __future__ import annotations

import functools
import logging
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import bentoml
from bentoml.exceptions import BadInput
from starlette.datastructures import UploadFile

try:  # every private name this project uses, in one place
    from _bentoml_impl.client.proxy2 import AsyncClient, SessionManager
    from _bentoml_impl.serde import JSONSerde, MultipartSerde, Payload
    from _bentoml_impl.server.app import ServiceAppFactory
    from _bentoml_sdk.io_models import IOMixin
    from _bentoml_sdk.method import APIMethod
    from bentoml._internal.configuration.containers import BentoMLContainer
    from bentoml._internal.context import server_context as _server_context
    from bentoml._internal.server.http.instruments import RunnerTrafficMetricsMiddleware
    from bentoml._internal.utils.metrics import exponential_buckets as _exponential_buckets
    from uvicorn.config import HTTP_PROTOCOLS as UVICORN_HTTP_PROTOCOLS
    from uvicorn.protocols.http.httptools_impl import STATUS_LINE as UVICORN_STATUS_LINE
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
except ImportError as exc:  # refuse to serve: the download of URLs given for files would stay open
    raise RuntimeError(f"BentoML {bentoml.__version__} is installed, but services/bentoml_compat.py is "
                       "written for the version pinned in pyproject.toml; install constraints.txt or "
                       "update this module (tests/unit/test_bentoml_compat.py names what changed)") from exc

logger = logging.getLogger(__name__)
BENTOML_VERSION = "1.4.40"  # the version this module is written against; the pin in pyproject.toml
PATCHED = "__rnnserve_patched__"  # set on a patched class, so that a second call changes nothing
# BentoML's functions that the patches replaced, by qualified name: read before they are replaced (a
# missing one fails the import instead of adding a dead attribute), and kept for the contract test,
# which checks their signatures.
REPLACED: dict[str, Callable[..., Any]] = {}

if bentoml.__version__ != BENTOML_VERSION:
    logger.warning("BentoML %s is installed; services/bentoml_compat.py is written for %s (run "
                   "tests/unit/test_bentoml_compat.py)", bentoml.__version__, BENTOML_VERSION)


# Patches -------------------------------------------------------------------------------------------


def cache_response_media_types() -> None:
    """Caches ``IOMixin.mime_type`` per output class.

    For an API that returns a list (a batchable API), BentoML finds the response's media type by
    building a pydantic ``TypeAdapter`` and a full JSON schema of the output type, on every response
    (``IOMixin.to_http_response -> mime_type -> IORootModel.model_json_schema``). Under load that was a
    large share of the sentiment worker's CPU (py-spy, ``python -m load.bench --profile``; figures in
    load/RESULTS.md). The answer depends only on the class, so it is computed once per class.
    """
    if getattr(IOMixin, PATCHED, False):
        return
    compute = REPLACED["IOMixin.mime_type"] = IOMixin.mime_type.__func__
    cache: dict[type, str] = {}

    def mime_type(cls: type) -> str:
        try:
            return cache[cls]
        except KeyError:
            cache[cls] = value = compute(cls)
            return value

    IOMixin.mime_type = classmethod(mime_type)
    setattr(IOMixin, PATCHED, True)


def cache_bound_api_functions() -> None:
    """Builds each API's bound function once per (function, service instance).

    BentoML rebuilds it on every attribute access (``APIMethod.__get__ -> _local_call``:
    ``inspect.signature`` plus ``functools.wraps``), which the request path does for every request; a
    profile of the entry worker under load showed it (load/RESULTS.md). The bound function depends
    only on the function and the instance, and holds no per-call state.
    """
    if getattr(APIMethod, PATCHED, False):
        return
    build = REPLACED["APIMethod._local_call"] = APIMethod._local_call
    cache: dict[tuple[object, int], tuple[object, object]] = {}

    def _local_call(self, instance):
        key = (self.func, id(instance))
        hit = cache.get(key)
        if hit is not None and hit[0] is instance:  # an id reused by a new instance is a miss
            return hit[1]
        bound = build(self, instance)
        cache[key] = (instance, bound)
        return bound

    APIMethod._local_call = _local_call
    setattr(APIMethod, PATCHED, True)


def refuse_remote_inputs() -> None:
    """Makes BentoML's request parsing refuse a URL where it expects a file, instead of fetching it.

    BentoML downloads the URL when a file-typed input (``pathlib.Path``, an image, a file) of a
    multipart form arrives as a text part (``MultipartSerde.ensure_file``) or when the JSON body of a
    root file input is a URL (``JSONSerde.parse_request``). Its private-address block is a
    process-wide switch that concurrent requests undo, and the download has no size bound: an outside
    probe made the server fetch loopback services and large bodies (SECURITY.md). This server never
    opens an outbound connection because of a request, so both now answer 400 without connecting.
    """
    if getattr(MultipartSerde, PATCHED, False):
        return
    REPLACED["MultipartSerde.ensure_file"] = MultipartSerde.ensure_file
    REPLACED["JSONSerde.parse_request"] = JSONSerde.parse_request

    async def ensure_file(obj: object) -> UploadFile:
        if isinstance(obj, UploadFile):
            return obj
        raise BadInput("A file field was sent as a text value; send the file itself as a multipart "
                       "file part (with a filename). URLs are never fetched.")

    async def parse_request(self, request, cls):
        body = await request.body()  # BentoML's version, without the download of a URL body
        return self.deserialize_model(Payload((body,), metadata=request.headers), cls)

    MultipartSerde.ensure_file = staticmethod(ensure_file)
    JSONSerde.parse_request = parse_request
    setattr(MultipartSerde, PATCHED, True)


def install_endpoint_handler(before_call: Callable[[Any, Any], Exception | None],
                             answer: Callable[[Any, BaseException], Any]) -> None:
    """Replaces BentoML's handling of what an endpoint raises with ``answer(request, exc)``.

    BentoML answers an endpoint's exception itself (``ServiceAppFactory.api_endpoint_wrapper``): a
    pydantic error as ``{"error": "N validation errors", "detail": [...]}``, a 4xx exception as a
    one-element list, any 5xx with one generic text, and logs every one at ERROR with a traceback.
    With this, each service process writes every error once, in the documented shape, with its own
    code (services/errors.py). ``before_call(service_instance, request)`` runs before each call: it
    takes what the request carries for the call (its id) and may return the error to raise instead (a
    model service whose artifact failed to load: services/lifecycle.py).
    """
    if getattr(ServiceAppFactory, PATCHED, False):
        return
    REPLACED["ServiceAppFactory.api_endpoint_wrapper"] = ServiceAppFactory.api_endpoint_wrapper

    async def api_endpoint_wrapper(self, name: str, request: Any) -> Any:
        try:
            if (refused := before_call(self._service_instance, request)) is not None:
                raise refused
            resp = await self.api_endpoint(name, request)
        except Exception as exc:
            resp = answer(request, exc)
        # What BentoML's wrapper does after the call, unchanged.
        self._add_response_headers(resp)
        ctx = self.service.context
        if resp.background is not None:
            ctx.response.background.tasks.append(resp.background)
        ctx.response.background.add_task(request.close)
        resp.background = ctx.response.background
        del ctx.response.background  # BentoML's guard against a reference cycle (a leak in long runs)
        return resp

    ServiceAppFactory.api_endpoint_wrapper = api_endpoint_wrapper
    setattr(ServiceAppFactory, PATCHED, True)


def close_abandoned_streams() -> None:
    """Closes the connection to a model service when the entry stops reading its stream.

    BentoML's client reads a dependency's stream (``AsyncClient._parse_stream_response``) without
    ever closing the response: when the entry's client hangs up, the entry's generator is cancelled,
    but its connection to the model service stays open, so that service never sees the disconnect and
    decodes the stream to its end (issue 13, finding 3: 50 dropped streams cost 35 CPU-seconds). Here
    the response is closed whenever the generator ends early; the model service then sees its
    client go and retires the stream's rows at its next decoder step (services/decoding.py).
    """
    if getattr(AsyncClient, PATCHED, False):
        return
    REPLACED["AsyncClient._parse_stream_response"] = AsyncClient._parse_stream_response

    async def _parse_stream_response(self, endpoint, resp):
        try:
            async for data in resp.content.iter_chunked(1024 * 8):
                yield self._deserialize_output(Payload((data,), resp.headers), endpoint)
        finally:
            resp.close()  # a no-op for a stream read to its end; closes the connection otherwise

    AsyncClient._parse_stream_response = _parse_stream_response
    setattr(AsyncClient, PATCHED, True)


UNKNOWN_ENDPOINT = "/unknown"  # the one ``endpoint`` label of every path no route answers
# BentoML 1.4.40's own routes of a service (base_app.get_system_routes, ServiceAppFactory): the
# entry's admission (services/admission.py Routes) and the metrics label share this one list.
SYSTEM_PATHS = frozenset({"/", "/livez", "/healthz", "/readyz", "/metrics", "/docs.json", "/schema.json"})
STATIC_PREFIXES = ("/static_content/", "/assets/")


def share_unknown_endpoint_label() -> None:
    """Counts every request to a path that no route answers under one ``endpoint="/unknown"`` label.

    BentoML's request metrics (``RunnerTrafficMetricsMiddleware``) label each request with its raw
    path, so random paths grew /metrics without bound (an outside probe: 2,000 paths made the scrape
    28 times larger and slower, SECURITY.md). The request itself goes on with the shared path, which
    no route answers either, so it is still a 404.
    """
    if getattr(RunnerTrafficMetricsMiddleware, PATCHED, False):
        return
    original = REPLACED["RunnerTrafficMetricsMiddleware.__call__"] = RunnerTrafficMetricsMiddleware.__call__
    known: set[str] = set()

    async def labelled_call(self, scope, receive, send):
        if scope["type"] == "http":
            if not known:
                known.update(SYSTEM_PATHS, _server_context.service_routes)
            path = scope["path"]
            if path not in known and not path.startswith(STATIC_PREFIXES):
                scope = {**scope, "path": UNKNOWN_ENDPOINT, "raw_path": UNKNOWN_ENDPOINT.encode()}
        await original(self, scope, receive, send)

    RunnerTrafficMetricsMiddleware.__call__ = labelled_call
    setattr(RunnerTrafficMetricsMiddleware, PATCHED, True)


@dataclass(frozen=True)
class ConnectionLimits:
    """What one connection may cost before it reaches the app (SECURITY.md): ``render(status, code,
    message)`` writes the error body, so that these answers have the service's error shape too."""

    header_timeout_s: float
    max_header_bytes: int
    keep_alive_s: float
    max_connections: int
    retry_after_s: int
    render: Callable[[int, str, str], bytes]


class BoundedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with the bounds it lacks.

    uvicorn 0.54 times out an idle connection only after a response (never one that sent nothing or
    trickles its headers), bounds neither the header size (httptools calls back per header: a 100 MB
    header cost 21 CPU-seconds) nor the number of connections, and answers a malformed request in
    plain text. Here: the request line and headers must arrive within ``header_timeout_s`` (408) and
    within ``max_header_bytes`` (431); past ``max_connections`` open connections per worker a new one
    is answered 503 and closed; idle keep-alive connections close after ``keep_alive_s``; and every
    such answer has the service's JSON error shape.
    """

    limits: ClassVar[ConnectionLimits]

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        if self.timeout_keep_alive is None:  # BentoML passes None: uvicorn would never close it
            self.timeout_keep_alive = self.limits.keep_alive_s
        self._header_bytes, self._reading_headers, self._header_timer = 0, True, None
        self._too_large, self._pending_bytes = False, 0
        if len(self.connections) > self.limits.max_connections:
            self._refuse(503, "too_many_connections", f"This worker has {len(self.connections) - 1} "
                         f"connections open; the limit is {self.limits.max_connections}. Retry after "
                         f"{self.limits.retry_after_s} s.")
            return
        self._arm_header_timer()

    def _arm_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
        self._header_timer = self.loop.call_later(self.limits.header_timeout_s, self._header_timeout)

    def _header_timeout(self) -> None:
        self._header_timer = None
        if self._reading_headers and not self.transport.is_closing():
            self._refuse(408, "header_timeout", f"The request line and headers did not arrive within "
                         f"{self.limits.header_timeout_s:g} s.")

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._header_bytes, self._reading_headers, self._too_large = 0, True, False
        self._arm_header_timer()

    def on_url(self, url: bytes) -> None:
        self._count_header_bytes(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count_header_bytes(len(name) + len(value) + 4)
        super().on_header(name, value)

    def _count_header_bytes(self, size: int) -> None:
        self._header_bytes += size
        if self._header_bytes > self.limits.max_header_bytes:
            self._too_large = True
            raise ValueError("headers too large")  # aborts parsing: httptools raises a parser error

    def on_headers_complete(self) -> None:
        self._reading_headers = False
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None
        super().on_headers_complete()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        # Bytes of a head whose line or header never ends (httptools reports a header once it ends).
        if self._reading_headers and not self.transport.is_closing():
            self._pending_bytes = getattr(self, "_pending_bytes", 0) + len(data)
            if self._pending_bytes > self.limits.max_header_bytes:
                self._too_large = True
                self.send_400_response("")
        else:
            self._pending_bytes = 0

    def connection_lost(self, exc: Exception | None) -> None:
        if getattr(self, "_header_timer", None) is not None:
            self._header_timer.cancel()
            self._header_timer = None
        super().connection_lost(exc)

    def send_400_response(self, msg: str) -> None:
        if getattr(self, "_too_large", False):
            self._refuse(431, "headers_too_large", f"The request line and headers are over "
                         f"{self.limits.max_header_bytes:,} bytes.")
            return
        self._refuse(400, "invalid_http", "The request is not valid HTTP/1.1.")

    def _refuse(self, status: int, code: str, message: str) -> None:
        body = self.limits.render(status, code, message)
        head = [UVICORN_STATUS_LINE[status], b"content-type: application/json\r\n",
                b"content-length: " + str(len(body)).encode() + b"\r\n", b"connection: close\r\n"]
        if status in (429, 503):
            head.append(b"retry-after: " + str(self.limits.retry_after_s).encode() + b"\r\n")
        self._reading_headers = False
        self.transport.write(b"".join([*head, b"\r\n", body]))
        self.transport.close()


def bound_connections(limits: ConnectionLimits) -> None:
    """Makes uvicorn use ``BoundedHttpToolsProtocol`` (it loads its protocol class by name when a
    worker starts, after the service module is imported)."""
    BoundedHttpToolsProtocol.limits = limits
    target = f"{__name__}:BoundedHttpToolsProtocol"
    REPLACED.setdefault("uvicorn.config.HTTP_PROTOCOLS", dict(UVICORN_HTTP_PROTOCOLS))
    UVICORN_HTTP_PROTOCOLS["auto"] = UVICORN_HTTP_PROTOCOLS["httptools"] = target


KEEPALIVE_PROBE_S = 1  # TCP keep-alive: idle time before the first probe and between probes (whole s)


def dependency_socket(addr_info: tuple, *, peer_timeout_s: float) -> socket.socket:
    """A TCP socket to a model service that gives up on a peer gone without closing the connection.

    TCP_USER_TIMEOUT (Linux): the kernel drops the connection, with ETIMEDOUT, once data it sent stays
    unacknowledged for ``peer_timeout_s``; keep-alive probes every ``KEEPALIVE_PROBE_S`` of silence
    make that hold for an idle pooled connection and for a request waiting on its answer too (with
    TCP_USER_TIMEOUT set, the kernel drops the connection when probes go unanswered that long). A
    live peer's kernel acknowledges the request and the probes at once, however long its model
    works, so a slow answer is never cut; nor is an answer that has started. Where an option is
    missing (not Linux) the socket gets what the platform has.
    """
    family, type_, proto, _, _ = addr_info
    sock = socket.socket(family=family, type=type_, proto=proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        for option in ("TCP_KEEPIDLE", "TCP_KEEPINTVL"):
            if hasattr(socket, option):
                sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, option), KEEPALIVE_PROBE_S)
        if hasattr(socket, "TCP_USER_TIMEOUT"):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, max(1, round(peer_timeout_s * 1000)))
    except OSError:
        sock.close()
        raise
    return sock


def bound_dependency_connects(connect_timeout_s: float, peer_timeout_s: float) -> None:
    """Bounds how long BentoML's client for a dependency (a model service reached by URL) waits on a
    peer that is not there; each case then answers 503 ``model_unavailable`` (services/errors.py), as
    a refused connection does, instead of waiting the whole request timeout (the session's only
    timeout, its total).

    * **Connecting**: an address that no longer answers (a stopped pod whose address a DNS cache still
      holds; a node that failed) fails after ``connect_timeout_s`` (aiohttp's ``sock_connect``).
    * **An open connection whose peer vanished without FIN or RST** (its network torn down before its
      process closed its sockets, a failed node, a partition): the next request on that pooled
      keep-alive connection, or a request already waiting for its answer, got no reply and no error.
      The split smoke (deploy/smoke_split.sh) showed it: after ``podman pod stop`` of translate, the
      entry's pooled connections to it stayed ESTABLISHED, the translate request written on one sat
      unacknowledged in the send queue with backed-off retransmissions, and the entry answered 503
      ``timeout`` after 29.5 s. Each connection's socket is now a ``dependency_socket``: dropped once
      what was sent (the request, or a keep-alive probe) stays unacknowledged for ``peer_timeout_s``.
      No read timeout is added, so a slow decode is never cut.

    An in-process app or a Unix socket (BentoML's own transports for a dependency without a URL) is
    left as BentoML builds it: it has no network peer to lose.
    """
    import aiohttp

    SessionManager.connect_timeout_s = connect_timeout_s
    SessionManager.peer_timeout_s = peer_timeout_s
    if getattr(SessionManager, PATCHED, False):
        return
    make_client = REPLACED["SessionManager._make_client"] = SessionManager._make_client

    def make_client_with_peer_timeout(self) -> aiohttp.ClientSession:
        if self._app is not None or self._parsed_url.scheme == "file":
            return make_client(self)
        # BentoML's base URL for a network dependency (tcp://host:port is served over http).
        url = self._parsed_url
        base_url = f"http://{url.netloc}" if url.scheme == "tcp" else url.geturl()
        total = self._timeout.total  # BentoML's only timeout: the service's request timeout
        connect = min(total, self.connect_timeout_s) if total else self.connect_timeout_s
        connector = aiohttp.TCPConnector(
            socket_factory=functools.partial(dependency_socket, peer_timeout_s=self.peer_timeout_s))
        return aiohttp.ClientSession(base_url=base_url, headers=self._headers, connector=connector,
                                     timeout=aiohttp.ClientTimeout(total=total, sock_connect=connect))

    SessionManager._make_client = make_client_with_peer_timeout
    setattr(SessionManager, PATCHED, True)


# Accessors -----------------------------------------------------------------------------------------


def service_metric_labels() -> dict[str, Any]:
    """The labels BentoML puts on its own service metrics for this worker: ``worker_index``,
    ``service_version`` and ``service_name``, read from its server context (set when a worker
    starts, so read at each call)."""
    return {"worker_index": _server_context.worker_index, "service_version": _server_context.bento_version,
            "service_name": _server_context.bento_name}


def exponential_buckets(start: float, factor: float, end: float) -> tuple[float, ...]:
    """BentoML's histogram buckets: ``start``, ``start * factor``, ... up to ``end``, then +Inf."""
    return _exponential_buckets(start, factor, end)


def metrics_histogram(*, namespace: str, name: str, documentation: str, labelnames: Sequence[str],
                      buckets: Sequence[float]) -> Any:
    """A Prometheus histogram from BentoML's metrics client: the one its server exports on /metrics,
    in prometheus_client's multiprocess mode across workers. Call it once per name and process."""
    return BentoMLContainer.metrics_client.get().Histogram(
        namespace=namespace, name=name, documentation=documentation, labelnames=list(labelnames),
        buckets=buckets)


def resolved_client(dependency: Any) -> Any | None:
    """The client a ``bentoml.depends`` dependency has already resolved (a remote proxy, or the local
    service instance), or None when the running service has not used it yet; resolves nothing."""
    return dependency._resolved


cache_response_media_types()
cache_bound_api_functions()
refuse_remote_inputs()
share_unknown_endpoint_label()
close_abandoned_streams()
