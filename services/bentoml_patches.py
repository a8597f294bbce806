"""BentoML 1.4.40 changed in two ways: no request ever makes the server fetch a URL, and per-request
overhead found by profiling (load/RESULTS.md) is removed.

Applied once, at import, by every service module that needs it; each patch is idempotent. The
performance patches keep BentoML's behaviour, only not recomputing what cannot change between
requests; ``refuse_remote_inputs`` removes a behaviour on purpose (SECURITY.md).
"""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)
PATCHED = "__rnnserve_patched__"  # set on a patched class, so that a second call changes nothing


def cache_response_media_types() -> None:
    """Caches ``IOMixin.mime_type`` per output class.

    For an API that returns a list (a batchable API), BentoML 1.4.40 finds the response's media type
    by building a pydantic ``TypeAdapter`` and a full JSON schema of the output type, on every
    response (``IOMixin.to_http_response -> mime_type -> IORootModel.model_json_schema``). Under
    load that was 18% of the sentiment worker's CPU (py-spy, ``python -m load.bench --profile``).
    The answer depends only on the class, so it is computed once per class.
    """
    try:
        from _bentoml_sdk.io_models import IOMixin
    except ImportError:  # another BentoML layout: nothing to patch
        logger.warning("BentoML's IOMixin not found; response media types are not cached")
        return
    if getattr(IOMixin, PATCHED, False):
        return
    compute = IOMixin.mime_type.__func__
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

    BentoML 1.4.40 rebuilds it on every attribute access (``APIMethod.__get__ -> _local_call``:
    ``inspect.signature`` plus ``functools.wraps``), which the request path does for every request:
    11% of the entry worker's CPU under load (py-spy, ``python -m load.bench --profile``). The bound
    function depends only on the function and the instance, and holds no per-call state.
    """
    try:
        from _bentoml_sdk.method import APIMethod
    except ImportError:
        logger.warning("BentoML's APIMethod not found; bound API functions are not cached")
        return
    if getattr(APIMethod, PATCHED, False):
        return
    build = APIMethod._local_call
    cache: dict[tuple[object, int], tuple[object, object]] = {}

    def _local_call(self, instance):
        key = (self.func, id(instance))
        hit = cache.get(key)
        if hit is not None and hit[0] is instance:
            return hit[1]
        bound = build(self, instance)
        cache[key] = (instance, bound)
        return bound

    APIMethod._local_call = _local_call
    setattr(APIMethod, PATCHED, True)


def refuse_remote_inputs() -> None:
    """Makes BentoML's request parsing refuse a URL where it expects a file, instead of fetching it.

    BentoML 1.4.40 downloads the URL when a file-typed input (``pathlib.Path``, an image, a file) of
    a multipart form arrives as a text part (``MultipartSerde.ensure_file``) or when the JSON body of
    a root file input is a URL (``JSONSerde.parse_request``). Its private-address block is a
    process-wide switch that concurrent requests undo, and the download has no size bound: an
    outside probe made the server fetch loopback services and 300 MB bodies. This server never opens
    an outbound connection because of a request, so both now answer 400 without connecting.
    """
    try:
        from _bentoml_impl.serde import JSONSerde, MultipartSerde, Payload
        from bentoml.exceptions import BadInput
        from starlette.datastructures import UploadFile
    except ImportError as exc:  # refuse to serve rather than serve with the download path open
        raise RuntimeError("BentoML's serde layout changed; services/bentoml_patches.py must be updated "
                           "before file inputs can be served safely") from exc
    if getattr(MultipartSerde, PATCHED, False):
        return

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


cache_response_media_types()
cache_bound_api_functions()
refuse_remote_inputs()
