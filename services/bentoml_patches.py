"""Per-request overhead removed from BentoML 1.4's serving path, found by profiling (load/RESULTS.md).

Applied once, at import, by every service module that needs it; each patch is idempotent and keeps
BentoML's behaviour, only not recomputing what cannot change between requests.
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


cache_response_media_types()
cache_bound_api_functions()
