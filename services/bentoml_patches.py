"""Per-request overhead removed from BentoML 1.4's serving path, found by profiling (load/RESULTS.md).

Applied once, at import, by every service module that needs it; each patch is idempotent and keeps
BentoML's behaviour, only not recomputing what cannot change between requests.
"""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)
_applied = False


def cache_response_media_types() -> None:
    """Caches ``IOMixin.mime_type`` per output class.

    For an API that returns a list (a batchable API), BentoML 1.4.40 finds the response's media type
    by building a pydantic ``TypeAdapter`` and a full JSON schema of the output type, on every
    response (``IOMixin.to_http_response -> mime_type -> IORootModel.model_json_schema``). Under
    load that was 18% of the sentiment worker's CPU (py-spy, ``python -m load.bench --profile``).
    The answer depends only on the class, so it is computed once per class.
    """
    global _applied
    if _applied:
        return
    try:
        from _bentoml_sdk.io_models import IOMixin
    except ImportError:  # another BentoML layout: nothing to patch
        logger.warning("BentoML's IOMixin not found; response media types are not cached")
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
    _applied = True


cache_response_media_types()
