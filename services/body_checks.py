"""Bodies no parser should see: JSON that is not UTF-8, not JSON, too deep or out of float range, and
multipart forms that do not parse or do not match the fields their endpoint declares.

Each check returns the ``ServiceError`` to answer with, or None when the body is acceptable; the
``Body`` middleware (services/admission.py) runs them before BentoML parses anything.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass
from typing import Any

from services.errors import ServiceError, field_path
from services.settings import SETTINGS

JSON_BODY = "rnnserve.json_body"  # the scope key under which admission.Body hands on a checked JSON body


def parse_json(body: bytes, max_depth: int) -> Any:
    """The JSON value of ``body``; raises the ``ServiceError`` for a body that is not UTF-8, not
    JSON, too deeply nested or holds a number out of float range (1e999, NaN, Infinity, an integer
    past 1.8e308).

    The schemas check everything else; this runs first so that no parser ever sees such a body.
    """
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ServiceError(400, "invalid_utf8", f"The body is not valid UTF-8 (byte {exc.start}: "
                           f"{body[exc.start:exc.start + 1]!r}); send JSON encoded as UTF-8.") from None
    try:
        value = json.loads(text)
    except RecursionError:
        raise ServiceError(400, "too_deeply_nested", f"JSON nesting is deeper than the limit of "
                           f"{max_depth} levels.") from None
    except json.JSONDecodeError as exc:
        raise ServiceError(400, "invalid_json", f"Invalid JSON: {exc.msg} (line {exc.lineno}, column "
                           f"{exc.colno}).") from None
    except ValueError as exc:  # an integer literal of more than sys.int_info.default_max_str_digits
        raise ServiceError(400, "number_out_of_range", f"Invalid JSON: {exc}. Numbers must be finite "
                           f"64-bit floats (at most {sys.float_info.max:.4g} in magnitude).") from None
    if (problem := check_value(value, max_depth)) is not None:
        raise problem
    return value


def check_json(body: bytes, max_depth: int) -> ServiceError | None:
    """``parse_json``'s verdict alone: the error, or None when the body is acceptable."""
    try:
        parse_json(body, max_depth)
    except ServiceError as error:
        return error
    return None


def check_value(value: Any, max_depth: int) -> ServiceError | None:
    """Depth, finite numbers and encodable strings of a parsed JSON value; None when acceptable.

    Runs on every request, so the common case (nothing wrong) takes a fast walk that tracks only
    the depth; the walk that also builds each value's path runs only to name the offending field.
    """
    if _acceptable(value, max_depth):
        return None
    return _locate_problem(value, max_depth)


def _acceptable(value: Any, max_depth: int) -> bool:
    if type(value) not in (dict, list):
        return _locate_problem(value, max_depth) is None
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if item and depth + 1 > max_depth:  # its values would sit past the limit
            return False
        for child in (item.values() if type(item) is dict else item):
            kind = type(child)
            if kind is float:
                if not math.isfinite(child):
                    return False
            elif kind is str:
                try:
                    child.encode("utf-8")
                except UnicodeEncodeError:
                    return False
            elif kind is int:
                if abs(child) > sys.float_info.max:
                    return False
            elif kind is dict or kind is list:
                stack.append((child, depth + 1))
    return True


def _locate_problem(value: Any, max_depth: int) -> ServiceError | None:
    """Walks a parsed JSON value without recursion, keeping each value's path for the message."""
    stack: list[tuple[Any, tuple[Any, ...]]] = [(value, ())]
    while stack:
        item, loc = stack.pop()
        if len(loc) > max_depth:
            return ServiceError(400, "too_deeply_nested", f"JSON nesting is deeper than the limit of "
                           f"{max_depth} levels.", field_path(loc))
        if isinstance(item, dict):
            stack.extend((v, (*loc, k)) for k, v in item.items())
        elif isinstance(item, list):
            stack.extend((v, (*loc, i)) for i, v in enumerate(item))
        elif isinstance(item, float) and not math.isfinite(item):
            return ServiceError(400, "number_out_of_range", "A number is out of float range (NaN, Infinity "
                           f"or beyond ±{sys.float_info.max:.4g}); send finite numbers.", field_path(loc))
        elif isinstance(item, int) and not isinstance(item, bool) and abs(item) > sys.float_info.max:
            return ServiceError(400, "number_out_of_range", "An integer is beyond the float range "
                           f"(±{sys.float_info.max:.4g}).", field_path(loc))
        elif isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return ServiceError(400, "invalid_unicode", "A string holds an unpaired UTF-16 surrogate "
                               "escape (\\ud800-\\udfff); send valid Unicode text.", field_path(loc))
    return None


@dataclass(frozen=True)
class FormSpec:
    """The fields a multipart endpoint declares, and which of them are files."""

    fields: frozenset[str]
    file_fields: frozenset[str]
    max_text_bytes: int = SETTINGS.http.max_form_field_bytes

    def describe(self) -> str:
        return ", ".join(sorted(self.fields))


def form_specs(service: Any) -> dict[str, FormSpec]:
    """Route -> FormSpec of every API of ``service`` that takes a file (multipart/form-data)."""
    specs = {}
    for method in getattr(service, "apis", {}).values():
        file_fields = frozenset(getattr(method.input_spec, "multipart_fields", ()) or ())
        if file_fields:
            specs[method.route] = FormSpec(frozenset(method.input_spec.model_fields), file_fields)
    return specs


async def check_multipart(body: bytes, raw_headers: list[tuple[bytes, bytes]],
                          spec: FormSpec | None = None) -> ServiceError | None:
    """Refuses a multipart body that does not parse (BentoML's parser error would be a 500) and,
    given the endpoint's ``spec``, one whose fields are not what it declares: an unknown field, a
    file field sent as a text value (BentoML would fetch it as a URL), a text field sent as a file,
    a field sent twice, or a text value longer than the spec allows.
    """
    from starlette.datastructures import Headers, UploadFile
    from starlette.formparsers import MultiPartException, MultiPartParser

    async def stream() -> Any:
        yield body
        yield b""

    try:
        form = await MultiPartParser(Headers(raw=raw_headers), stream()).parse()
    except MultiPartException as exc:
        return ServiceError(400, "invalid_multipart", f"The multipart/form-data body does not parse: {exc}",
                       None)
    except (ValueError, KeyError) as exc:  # no boundary, bad header encoding
        return ServiceError(400, "invalid_multipart", f"The multipart/form-data body does not parse: "
                       f"{type(exc).__name__}.", "Content-Type")
    try:
        if spec is None:
            return None
        for name in dict.fromkeys(form.keys()):
            shown = json.dumps(name)[:80]  # a client's text: quoted, so it cannot break a log line
            if name not in spec.fields:
                return ServiceError(400, "unknown_field", f"Unknown form field {shown}; this endpoint takes "
                               f"{spec.describe()}.", name[:80])
            values = form.getlist(name)
            if len(values) > 1:
                return ServiceError(400, "invalid_multipart", f"Form field {shown} was sent {len(values)} "
                               "times; send it once.", name)
            [value] = values
            if name in spec.file_fields and not isinstance(value, UploadFile):
                return ServiceError(400, "invalid_multipart", f"Form field {shown} must be a file part "
                                    "(with a filename), not a text value; URLs are never fetched.", name)
            if name not in spec.file_fields:
                if isinstance(value, UploadFile):
                    return ServiceError(400, "invalid_multipart", f"Form field {shown} must be a text value, "
                                   "not a file part.", name)
                if len(value.encode()) > spec.max_text_bytes:
                    return ServiceError(400, "invalid_multipart", f"Form field {shown} is "
                                   f"{len(value.encode()):,} bytes; the limit for a text field is "
                                   f"{spec.max_text_bytes} bytes.", name)
        return None
    finally:
        await form.close()
