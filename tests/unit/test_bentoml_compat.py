"""The contract of services/bentoml_compat.py with BentoML's private API (and the pins that hold it).

When an upgrade moves, renames or re-signs anything the compat module relies on, a test here fails and
its message names the symbol, what it was and what it is now. Then update the module, the expected
values below, pyproject.toml and constraints.txt together.
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import re
import socket
import tomllib
from importlib.metadata import version
from pathlib import Path

import pytest

import services.lifecycle  # noqa: F401 - installs the endpoint handler, the one patch applied on demand

ROOT = Path(__file__).resolve().parents[2]

# (module, attribute path, parameter names of inspect.signature, what services/bentoml_compat.py does
# with it). None: only its presence is relied on.
CONTRACT = [
    ("bentoml._internal.context", "server_context", None, "service_metric_labels reads it"),
    ("bentoml._internal.context", "server_context.worker_index", None, "service_metric_labels"),
    ("bentoml._internal.context", "server_context.bento_name", None, "service_metric_labels"),
    ("bentoml._internal.context", "server_context.bento_version", None, "service_metric_labels"),
    ("bentoml._internal.configuration.containers", "BentoMLContainer.metrics_client.get", [],
     "metrics_histogram gets BentoML's metrics client"),
    ("bentoml._internal.server.metrics.prometheus", "PrometheusClient.Histogram", None,
     "metrics_histogram builds the histogram with it"),
    ("prometheus_client", "Histogram", ["name", "documentation", "labelnames", "namespace", "subsystem",
                                        "unit", "registry", "_labelvalues", "buckets"], "metrics_histogram"),
    ("bentoml._internal.utils.metrics", "exponential_buckets", ["start", "factor", "end"],
     "exponential_buckets"),
    ("_bentoml_sdk.service.dependency", "Dependency", ["on", "deployment", "cluster", "url"],
     "resolved_client reads its _resolved field"),
    ("_bentoml_impl.serde", "Payload", ["data", "metadata"], "refuse_remote_inputs builds the payload"),
    ("_bentoml_impl.serde", "JSONSerde.deserialize_model", ["self", "payload", "cls"],
     "refuse_remote_inputs parses the body with it"),
    ("_bentoml_impl.serde", "MultipartSerde.parse_request", ["self", "request", "cls"],
     "calls self.ensure_file for each file field"),
    ("_bentoml_sdk.io_models", "IODescriptor.from_output", ["func"], "this test builds output types"),
    ("bentoml._internal.context", "server_context.service_routes", None,
     "share_unknown_endpoint_label: the routes that keep their own endpoint label"),
    ("uvicorn.config", "HTTP_PROTOCOLS", None, "bound_connections names its protocol class there"),
    ("uvicorn.protocols.http.httptools_impl", "STATUS_LINE", None, "BoundedHttpToolsProtocol._refuse"),
    *[("uvicorn.protocols.http.httptools_impl", f"HttpToolsProtocol.{name}", parameters,
       "BoundedHttpToolsProtocol overrides it")
      for name, parameters in [("connection_made", ["self", "transport"]), ("on_message_begin", ["self"]),
                               ("on_url", ["self", "url"]), ("on_header", ["self", "name", "value"]),
                               ("on_headers_complete", ["self"]), ("data_received", ["self", "data"]),
                               ("connection_lost", ["self", "exc"]), ("send_400_response", ["self", "msg"])]],
    ("_bentoml_impl.client.proxy2", "SessionManager._make_client", ["self"],
     "bound_dependency_connects: the session it builds takes SessionManager._timeout"),
    ("_bentoml_impl.client.proxy2", "SessionManager.get_session", ["self"],
     "bound_dependency_connects: each session comes from _make_client (the tests build it so)"),
    ("_bentoml_impl.client.proxy2", "AsyncClient._deserialize_output", ["self", "payload", "endpoint"],
     "close_abandoned_streams decodes each chunk with it"),
    ("_bentoml_impl.server.app", "ServiceAppFactory.api_endpoint", ["self", "name", "request"],
     "install_endpoint_handler calls it for each request"),
    ("_bentoml_impl.server.app", "ServiceAppFactory._add_response_headers",
     ["self", "resp", "logging_format"],
     "install_endpoint_handler adds BentoML's headers with it"),
]

# BentoML's functions that the patches replace: their signatures, as the originals had them.
REPLACED = {
    "IOMixin.mime_type": ["cls"],
    "APIMethod._local_call": ["self", "instance"],
    "MultipartSerde.ensure_file": ["obj"],
    "JSONSerde.parse_request": ["self", "request", "cls"],
    "ServiceAppFactory.api_endpoint_wrapper": ["self", "name", "request"],
    "RunnerTrafficMetricsMiddleware.__call__": ["self", "scope", "receive", "send"],
    "AsyncClient._parse_stream_response": ["self", "endpoint", "resp"],
    "SessionManager._make_client": ["self"],
}


def pinned(requirement: str, lines: list[str]) -> str | None:
    """The version ``lines`` pin ``requirement`` to with ``==``, or None."""
    name = re.escape(requirement).replace("\\-", "[-_]")
    for line in lines:
        if match := re.fullmatch(rf"\s*{name}\s*==\s*([^\s;#]+).*", line, flags=re.IGNORECASE):
            return match.group(1)
    return None


def resolve(module: str, path: str):
    """The object at ``module.path``, or a test failure naming the first missing part."""
    import bentoml

    try:
        obj = importlib.import_module(module)
    except ImportError as exc:
        pytest.fail(f"BentoML {bentoml.__version__}: module {module} is gone ({exc})")
    for part in path.split("."):
        if not hasattr(obj, part):
            pytest.fail(f"BentoML {bentoml.__version__}: {module}.{path} is gone: no attribute {part!r} on "
                        f"{obj!r}; services/bentoml_compat.py relies on it")
        obj = getattr(obj, part)
    return obj


def parameter_names(obj) -> list[str]:
    return list(inspect.signature(obj).parameters)


def test_installed_bentoml_is_the_pinned_version():
    import bentoml

    from services.bentoml_compat import BENTOML_VERSION

    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    pin = pinned("bentoml", dependencies)
    assert pin is not None, f"pyproject.toml must pin bentoml exactly (bentoml==X.Y.Z): {dependencies}"
    assert bentoml.__version__ == pin, (f"BentoML {bentoml.__version__} is installed but pyproject.toml pins "
                                        f"{pin}: run `make setup`, or upgrade services/bentoml_compat.py")
    assert pin == BENTOML_VERSION, (f"services/bentoml_compat.py is written for BentoML {BENTOML_VERSION}, "
                                    f"pyproject.toml pins {pin}")


def test_installed_packages_match_constraints():
    lines = (ROOT / "constraints.txt").read_text().splitlines()
    pins = {match.group(1): match.group(2) for line in lines
            if (match := re.fullmatch(r"([\w.-]+)==(\S+)", line.strip()))}
    assert {"bentoml", "starlette", "uvicorn", "pydantic", "pydantic-core", "aiohttp", "httpx",
            "prometheus-client"} <= set(pins), f"constraints.txt lacks a pin: {sorted(pins)}"
    assert "torch" not in pins, "torch is pinned in pyproject.toml: a constraint breaks its CPU or CUDA build"
    changed = {name: (pin, version(name)) for name, pin in pins.items() if version(name) != pin}
    assert not changed, ("installed versions differ from constraints.txt (pinned, installed): "
                         f"{changed}; run `make setup`, or upgrade services/bentoml_compat.py and the pins")
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert pinned("bentoml", pyproject) == pins["bentoml"], ("pyproject.toml and constraints.txt pin "
                                                             "different BentoML versions")


@pytest.mark.parametrize(("module", "path", "parameters", "use"), CONTRACT, ids=[c[1] for c in CONTRACT])
def test_private_symbol_exists_with_the_signature_used(module, path, parameters, use):
    import bentoml

    obj = resolve(module, path)
    if parameters is not None:
        assert parameter_names(obj) == parameters, (
            f"BentoML {bentoml.__version__}: the signature of {module}.{path} changed from {parameters} to "
            f"{parameter_names(obj)}; services/bentoml_compat.py: {use}")


def test_dependency_keeps_its_resolved_client_in_the_field_read():
    import attrs
    import bentoml
    from _bentoml_sdk.service.dependency import Dependency

    from services.bentoml_compat import resolved_client

    assert "_resolved" in attrs.fields_dict(Dependency), (
        f"BentoML {bentoml.__version__}: Dependency has no _resolved field any more "
        f"({sorted(attrs.fields_dict(Dependency))}); update resolved_client")

    @bentoml.service
    class Echo:
        @bentoml.api
        def echo(self, text: str) -> str:
            return text

    class Caller:
        echo = bentoml.depends(Echo)

    dependency = vars(Caller)["echo"]
    assert resolved_client(dependency) is None  # not used yet: nothing resolved
    client = Caller().echo
    assert resolved_client(dependency) is client, "Dependency.__get__ no longer keeps the client in _resolved"


@pytest.mark.parametrize(("name", "parameters"), REPLACED.items())
def test_replaced_function_had_the_signature_patched_for(name, parameters):
    import bentoml

    from services import bentoml_compat

    assert name in bentoml_compat.REPLACED, f"the patch of {name} did not run"
    original = bentoml_compat.REPLACED[name]
    assert parameter_names(original) == parameters, (
        f"BentoML {bentoml.__version__}: the signature of {name} changed from {parameters} to "
        f"{parameter_names(original)}; services/bentoml_compat.py replaces it with one of the old signature")


def test_every_replaced_function_is_in_this_contract():
    # Read from the source: a patch applied on demand (not at import) has not filled REPLACED yet.
    source = (ROOT / "services" / "bentoml_compat.py").read_text()
    unchecked = sorted(set(re.findall(r'REPLACED\["([^"]+)"\]', source)) - set(REPLACED))
    assert not unchecked, (f"services/bentoml_compat.py replaces {unchecked}: add their signatures to "
                           "REPLACED in this test, and what else they use to CONTRACT")


def test_each_patch_is_active_and_idempotent():
    from _bentoml_impl.serde import JSONSerde, MultipartSerde
    from _bentoml_impl.server.app import ServiceAppFactory
    from _bentoml_sdk.io_models import IOMixin
    from _bentoml_sdk.method import APIMethod
    from bentoml._internal.server.http.instruments import RunnerTrafficMetricsMiddleware

    from services import bentoml_compat

    patched = {"ServiceAppFactory.api_endpoint_wrapper": ServiceAppFactory.api_endpoint_wrapper,
               "RunnerTrafficMetricsMiddleware.__call__": RunnerTrafficMetricsMiddleware.__call__,
               "IOMixin.mime_type": IOMixin.mime_type.__func__,
               "APIMethod._local_call": APIMethod._local_call,
               "MultipartSerde.ensure_file": MultipartSerde.ensure_file,
               "JSONSerde.parse_request": JSONSerde.parse_request}
    for name, function in patched.items():
        assert function.__module__ == "services.bentoml_compat", f"{name} is BentoML's own, not the patch"
    bentoml_compat.cache_response_media_types()
    bentoml_compat.cache_bound_api_functions()
    bentoml_compat.refuse_remote_inputs()
    bentoml_compat.share_unknown_endpoint_label()
    assert RunnerTrafficMetricsMiddleware.__call__ is patched["RunnerTrafficMetricsMiddleware.__call__"]
    assert IOMixin.mime_type.__func__ is patched["IOMixin.mime_type"], "a second patch wrapped the first"
    assert APIMethod._local_call is patched["APIMethod._local_call"], "a second patch wrapped the first"
    assert JSONSerde.parse_request is patched["JSONSerde.parse_request"], "a second patch wrapped the first"


def test_response_media_type_is_computed_once_per_class(monkeypatch):
    from _bentoml_sdk.io_models import IODescriptor

    import services.bentoml_compat  # noqa: F401 - applies the patch

    def batch(self, texts: list[str]) -> list[str]:
        return texts

    output = IODescriptor.from_output(batch)  # a list output: BentoML builds its JSON schema to answer
    schema = output.model_json_schema
    calls = []

    def counted(*args, **kwargs):
        calls.append(1)
        return schema(*args, **kwargs)

    monkeypatch.setattr(output, "model_json_schema", counted)
    first, second = output.mime_type(), output.mime_type()
    assert first == second == "application/json"
    assert len(calls) == 1, f"the media type was computed {len(calls)} times for one class"


def test_api_function_is_bound_once_per_instance():
    import bentoml

    import services.bentoml_compat  # noqa: F401 - applies the patch

    @bentoml.service
    class Echo:
        @bentoml.api(batchable=True)
        def echo(self, texts: list[str]) -> list[str]:
            return texts

    method = Echo.apis["echo"]
    first, second = Echo(), Echo()
    bound = method._local_call(first)
    assert method._local_call(first) is bound
    assert method._local_call(second) is not bound
    assert bound(["a"]) == ["a"] and method._local_call(second)(["b"]) == ["b"]


def test_bentoml_never_fetches_a_url_given_for_a_file_input():
    """The patched serde refuses without opening any connection."""
    from _bentoml_impl.serde import JSONSerde, MultipartSerde
    from _bentoml_sdk.io_models import IODescriptor
    from bentoml.exceptions import BadInput
    from starlette.requests import Request

    import services.bentoml_compat  # noqa: F401 - applies the patch

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    listener.setblocking(False)
    url = f"http://127.0.0.1:{listener.getsockname()[1]}/x.png"
    with pytest.raises(BadInput, match="URLs are never fetched"):
        asyncio.run(MultipartSerde.ensure_file(url))

    def root(self, image: Path, /) -> str:
        return ""

    descriptor = IODescriptor.from_input(root, skip_self=True)
    assert descriptor.multipart_fields  # a root file input: BentoML would download a URL body

    async def receive():
        return {"type": "http.request", "body": url.encode(), "more_body": False}

    request = Request({"type": "http", "method": "POST", "headers": [], "path": "/", "query_string": b""},
                      receive)
    with pytest.raises(Exception) as raised:
        asyncio.run(JSONSerde().parse_request(request, descriptor))
    assert not isinstance(raised.value, AssertionError)
    with pytest.raises(BlockingIOError):  # nothing ever connected to the listener
        listener.accept()
    listener.close()


def test_no_other_service_module_touches_bentoml_private_api():
    private = re.compile(r"_bentoml_sdk|_bentoml_impl|bentoml\._internal|\._resolved\b")
    offenders = [f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
                 for path in sorted((ROOT / "services").rglob("*.py")) if path.name != "bentoml_compat.py"
                 for number, line in enumerate(path.read_text().splitlines(), 1) if private.search(line)]
    assert not offenders, f"BentoML's private API belongs in services/bentoml_compat.py: {offenders}"


def restore_dependency_bounds() -> None:
    """The bounds services/lifecycle.py installs, after a test changed them."""
    from services import bentoml_compat
    from services.settings import SETTINGS

    bentoml_compat.bound_dependency_connects(SETTINGS.http.connect_timeout_s, SETTINGS.http.peer_timeout_s)


def test_a_dependency_that_does_not_accept_fails_at_the_connect_timeout_as_unavailable():
    """A listener whose accept queue is full drops new SYNs: the connection neither opens nor is
    refused, as with a stopped pod's address still in a DNS cache. BentoML's client session (patched
    by bound_dependency_connects) gives up at the connect timeout, not at its total timeout, and the
    entry maps that to 503 model_unavailable."""
    import asyncio
    import socket

    import aiohttp
    from _bentoml_impl.client.proxy2 import SessionManager

    from services import bentoml_compat
    from services.errors import to_service_error
    from services.settings import SETTINGS

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    held = []
    for _ in range(4):  # fill the accept queue; nothing ever accepts
        held.append(client := socket.socket())
        client.setblocking(False)
        client.connect_ex(("127.0.0.1", port))
    try:
        bentoml_compat.bound_dependency_connects(0.3, SETTINGS.http.peer_timeout_s)
        manager = SessionManager(f"http://127.0.0.1:{port}", timeout=20.0, headers={})

        async def call() -> BaseException:
            session = await manager.get_session()
            assert session.timeout.total == 20.0 and session.timeout.sock_connect == 0.3
            try:
                async with session.post("/translate", json={}) as response:
                    pytest.fail(f"connected to a listener that never accepts: {response.status}")
            except Exception as exc:  # the error is what is checked
                return exc
            finally:
                await manager.close()

        error = asyncio.run(asyncio.wait_for(call(), 15.0))
        assert isinstance(error, aiohttp.ConnectionTimeoutError), repr(error)
        answer = to_service_error(error)
        assert (answer.status, answer.code) == (503, "model_unavailable")
    finally:
        restore_dependency_bounds()
        for client in held:
            client.close()
        listener.close()


class KeepAlivePeer:
    """A fake model service on 127.0.0.1 (a thread, real sockets): accepts connections, answers the
    first request of each with 200 on the kept-alive connection (the body's last byte once
    ``first_read`` is set, so that the client can look at the open connection), then does what
    ``after_first`` says:
    ``"silent"`` (never reads again: what the entry sends next is not taken, as from a peer that is
    gone), or ``"slow"`` (reads the next request, then answers it after ``slow_s``)."""

    def __init__(self, after_first: str, slow_s: float = 0.0) -> None:
        import threading

        self.after_first, self.slow_s = after_first, slow_s
        self.accepted: list[socket.socket] = []
        self.requests: list[bytes] = []  # each request's line and headers
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # inherited by accepted ones
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(8)
        self.port = self.listener.getsockname()[1]
        self.done, self.first_read = threading.Event(), threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def _read_request(self, conn: socket.socket) -> None:
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = conn.recv(65536)
            if not chunk:
                raise ConnectionError("the client closed")
            data += chunk
        head, body = data.split(b"\r\n\r\n", 1)
        self.requests.append(head)
        length = int(re.search(rb"(?im)^content-length:\s*(\d+)", head).group(1))
        while len(body) < length:
            body += conn.recv(65536)

    def _answer(self, conn: socket.socket, first: bool = False) -> None:
        conn.sendall(b'HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{')
        if first:
            self.first_read.wait(10.0)
        conn.sendall(b'}')

    def _serve(self) -> None:
        try:
            while not self.done.is_set():
                conn, _ = self.listener.accept()
                self.accepted.append(conn)
                self._read_request(conn)
                self._answer(conn, first=True)
                if self.after_first == "slow":
                    self._read_request(conn)
                    self.done.wait(self.slow_s)
                    self._answer(conn)
                # "silent": nothing is read from this connection again
        except OSError:  # closed by close()
            pass

    def close(self) -> None:
        self.done.set()
        for conn in [*self.accepted, self.listener]:
            conn.close()


def linux_with_user_timeout_on_a_zero_window() -> bool:
    """TCP_USER_TIMEOUT counts a zero window too from Linux 5.11 (a peer that takes no bytes)."""
    import platform

    if not hasattr(socket, "TCP_USER_TIMEOUT"):
        return False
    release = re.match(r"(\d+)\.(\d+)", platform.release())
    return bool(release) and tuple(map(int, release.groups())) >= (5, 11)


def dependency_call(manager, peer: KeepAlivePeer, path: str,
                    body: bytes) -> tuple[int | None, BaseException | None, dict]:
    """Two POSTs through ``manager``'s session (BentoML's for a dependency): the first opens the
    keep-alive connection, the second (``body``) goes on it. The second's status or error, and the
    socket options of the connection, read while the first answer is open."""
    import aiohttp

    async def run():
        options = {}
        session = await manager.get_session()
        try:
            async with session.post("/first", json={}) as response:
                assert response.status == 200
                sock = response.connection.transport.get_extra_info("socket")
                options["keepalive"] = sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE)
                for name in ("TCP_USER_TIMEOUT", "TCP_KEEPIDLE", "TCP_KEEPINTVL"):
                    if hasattr(socket, name):
                        options[name] = sock.getsockopt(socket.IPPROTO_TCP, getattr(socket, name))
                peer.first_read.set()
                await response.read()
            try:
                async with session.post(path, data=body) as response:
                    await response.read()
                    return response.status, None, options
            except aiohttp.ClientError as exc:  # the error is what is checked
                return None, exc, options
        finally:
            await manager.close()

    return asyncio.run(asyncio.wait_for(run(), 60.0))


@pytest.mark.parametrize("scheme", ["http", "tcp"])
def test_dependency_connections_are_bentomls_with_the_peer_timeout(scheme):
    """A network dependency's session is the one BentoML builds (its base URL, headers and timeout)
    on sockets that give up on a silent peer: keep-alive probes and TCP_USER_TIMEOUT (Linux)."""
    from _bentoml_impl.client.proxy2 import SessionManager

    from services import bentoml_compat
    from services.settings import SETTINGS

    peer = KeepAlivePeer("slow")
    try:
        bentoml_compat.bound_dependency_connects(SETTINGS.http.connect_timeout_s, 0.25)
        manager = SessionManager(f"{scheme}://127.0.0.1:{peer.port}", timeout=20.0, headers={"X-Probe": "1"})
        status, error, options = dependency_call(manager, peer, "/second", b"{}")
        assert (status, error) == (200, None)
        assert [head.split(b"\r\n")[0] for head in peer.requests] == [b"POST /first HTTP/1.1",
                                                                      b"POST /second HTTP/1.1"]
        assert all(re.search(rb"(?im)^x-probe: 1\r?$", head) for head in peer.requests), peer.requests
        assert len(peer.accepted) == 1, "the second request did not reuse the kept-alive connection"
        assert options["keepalive"] == 1, options
        if hasattr(socket, "TCP_USER_TIMEOUT"):
            assert options["TCP_USER_TIMEOUT"] == 250, options
            assert options["TCP_KEEPIDLE"] == options["TCP_KEEPINTVL"] == bentoml_compat.KEEPALIVE_PROBE_S
    finally:
        restore_dependency_bounds()
        peer.close()


@pytest.mark.skipif(not linux_with_user_timeout_on_a_zero_window(),
                    reason="needs Linux 5.11+ (TCP_USER_TIMEOUT on a zero window) to silence a loopback peer")
def test_a_kept_alive_connection_whose_peer_goes_silent_is_dropped_as_unavailable():
    """The smoke's failure, on loopback: the peer answered one request on a kept-alive connection,
    then took nothing more (a loopback peer cannot vanish without FIN or RST; one that takes no bytes
    leaves what the entry sends unacknowledged just the same). BentoML's session alone waits for its
    total timeout (20 s here); patched, the kernel drops the connection at the peer timeout, aiohttp
    raises ETIMEDOUT, and the entry answers 503 model_unavailable."""
    import errno

    import aiohttp
    from _bentoml_impl.client.proxy2 import SessionManager

    from services import bentoml_compat
    from services.errors import to_service_error
    from services.settings import SETTINGS

    peer = KeepAlivePeer("silent")
    try:
        bentoml_compat.bound_dependency_connects(SETTINGS.http.connect_timeout_s, 0.3)
        manager = SessionManager(f"http://127.0.0.1:{peer.port}", timeout=20.0, headers={})
        status, error, _ = dependency_call(manager, peer, "/translate", b"x" * (8 << 20))
        assert status is None, f"a peer that reads nothing answered {status}"
        assert len(peer.accepted) == 1, "the request did not go on the kept-alive connection"
        assert isinstance(error, aiohttp.ClientOSError) and error.errno == errno.ETIMEDOUT, repr(error)
        answer = to_service_error(error)
        assert (answer.status, answer.code) == (503, "model_unavailable")
    finally:
        restore_dependency_bounds()
        peer.close()


def test_a_slow_answer_is_not_cut_by_the_peer_timeout():
    """A live peer that takes the request and answers long after the peer timeout (and after
    keep-alive probes of the waiting connection) is answered: the bound is on acknowledgements, not
    on how long the model works."""
    from _bentoml_impl.client.proxy2 import SessionManager

    from services import bentoml_compat
    from services.settings import SETTINGS

    slow_s = 2.5 * bentoml_compat.KEEPALIVE_PROBE_S  # past the first probes; 10x the peer timeout
    peer = KeepAlivePeer("slow", slow_s=slow_s)
    try:
        bentoml_compat.bound_dependency_connects(SETTINGS.http.connect_timeout_s, 0.25)
        manager = SessionManager(f"http://127.0.0.1:{peer.port}", timeout=20.0, headers={})
        status, error, _ = dependency_call(manager, peer, "/translate", b"{}")
        assert (status, error) == (200, None)
        assert len(peer.accepted) == 1
    finally:
        restore_dependency_bounds()
        peer.close()


def test_in_process_and_unix_socket_dependencies_keep_bentomls_connector():
    """Without a URL a dependency runs in the entry's process tree (an ASGI app, a Unix socket): no
    network peer to lose, so BentoML's own session is built."""
    import aiohttp
    from _bentoml_impl.client.proxy2 import SessionManager

    async def app(scope, receive, send):  # never called
        raise AssertionError

    async def connectors():
        managers = [SessionManager("http://127.0.0.1:3000", timeout=20.0, headers={}, app=app),
                    SessionManager("file:///tmp/rnnserve-compat-test.sock", timeout=20.0, headers={})]
        sessions = [manager._make_client() for manager in managers]
        try:
            return [type(session.connector) for session in sessions]
        finally:
            for session in sessions:
                await session.close()

    kinds = asyncio.run(connectors())
    assert kinds[0].__name__ == "ASGIApplicationConnector" and kinds[1] is aiohttp.UnixConnector, kinds
