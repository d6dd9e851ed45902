"""Building ``HTTPHeaders`` on the proxy's hot path without validating every field twice.

Every header a proxied request carries passes through several ``HTTPHeaders`` objects: the
request Tornado parsed, the copy sent upstream, the response head read from the child, the
headers written to the client. ``HTTPHeaders.add`` checks the name and the value against the
RFC 9110 grammar each time (two regular-expression matches, a normalization and a few calls
per field), so a tiny request paid for about fourteen such checks. Here each field is checked
once, where it enters the gateway, and copies reuse the checked lists.

Both functions keep ``HTTPHeaders``' semantics: same normalized names, same order, repeats
kept; input they cannot vouch for goes through ``HTTPHeaders`` itself, so a malformed head
raises the same ``HTTPInputError``. They rely on ``HTTPHeaders`` keeping its fields in
``_as_list`` (Tornado 6.x); if that ever changes they fall back to the public API.
"""
from __future__ import annotations

import re
from typing import Dict, Iterable, List, Optional, Tuple, Type, TypeVar

from tornado import httputil

__all__ = ["copy_headers", "empty_headers", "field_lines", "fields", "get_field",
           "get_fields", "headers_from_fields", "parse_header_block"]

H = TypeVar("H", bound=httputil.HTTPHeaders)

_PROBE = httputil.HTTPHeaders()
#: HTTPHeaders stores its fields as {normalized name: [values]} (Tornado 6.x).
FAST = isinstance(getattr(_PROBE, "_as_list", None), dict) and isinstance(
    getattr(_PROBE, "_combined_cache", None), dict)

# One field line: a token, a colon, optional whitespace, the value. Anything else (folded
# lines, spaces before the colon, a missing colon...) goes to HTTPHeaders.parse, which
# refuses it with its own error.
_FIELD = re.compile(r"^([!#$%&'*+\-.^_`|~0-9A-Za-z]+):[ \t]*(.*?)[ \t]*\r?$", re.MULTILINE)
# Characters no field value may contain (RFC 9110 5.5): controls other than HTAB, and DEL.
# CR and LF are the line separators here; a bare CR is refused separately.
_FORBIDDEN = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]|\r(?!\n)")

_normalized: Dict[str, str] = {}


def _normalize(name: str) -> str:
    """``Content-Type`` for ``content-type``, as HTTPHeaders does (cached)."""
    norm = _normalized.get(name)
    if norm is None:
        norm = "-".join(w.capitalize() for w in name.split("-"))
        if len(_normalized) < 1000:
            _normalized[name] = norm
    return norm


def _build(cls: Type[H], fields: Dict[str, List[str]]) -> H:
    # What HTTPHeaders.__init__ leaves, without its generic update() machinery.
    headers = cls.__new__(cls)
    headers._as_list = fields  # type: ignore[attr-defined]
    headers._combined_cache = {}  # type: ignore[attr-defined]
    return headers


def empty_headers() -> httputil.HTTPHeaders:
    """``HTTPHeaders()``, cheaper."""
    return _build(httputil.HTTPHeaders, {}) if FAST else httputil.HTTPHeaders()


def copy_headers(source: httputil.HTTPHeaders, cls: Optional[Type[H]] = None) -> H:
    """A copy of ``source`` (already validated when its fields were added)."""
    target = cls or type(source)
    as_list = getattr(source, "_as_list", None)
    if FAST and isinstance(as_list, dict):
        return _build(target, {name: list(values) for name, values in as_list.items()})
    copy = target()
    for name, value in source.get_all():
        copy.add(name, value)
    return copy  # type: ignore[return-value]


def headers_from_fields(fields: Iterable[Tuple[str, str]],
                        cls: Type[H] = httputil.HTTPHeaders) -> H:  # type: ignore[assignment]
    """HTTPHeaders from (name, value) pairs taken from another, already validated
    HTTPHeaders (names normalized, values checked)."""
    if not FAST:
        headers = cls()
        for name, value in fields:
            headers.add(name, value)
        return headers
    as_list: Dict[str, List[str]] = {}
    for name, value in fields:
        values = as_list.get(name)
        if values is None:
            as_list[name] = [value]
        else:
            values.append(value)
    return _build(cls, as_list)


def get_field(headers: httputil.HTTPHeaders, name: str) -> Optional[str]:
    """``headers.get(name)`` for a name already in normalized form (``Content-Length``),
    without the KeyError that ``Mapping.get`` raises and catches for an absent field."""
    as_list = getattr(headers, "_as_list", None)
    if FAST and isinstance(as_list, dict):
        values = as_list.get(name)
        if values is None:
            return None
        return values[0] if len(values) == 1 else ",".join(values)
    return headers.get(name)


def get_fields(headers: httputil.HTTPHeaders, name: str) -> List[str]:
    """``headers.get_list(name)`` for a name already in normalized form."""
    as_list = getattr(headers, "_as_list", None)
    if FAST and isinstance(as_list, dict):
        return as_list.get(name) or []
    return headers.get_list(name)


def fields(headers: httputil.HTTPHeaders) -> List[Tuple[str, str]]:
    """``list(headers.get_all())`` (one list comprehension, no generator step per field)."""
    as_list = getattr(headers, "_as_list", None)
    if FAST and isinstance(as_list, dict):
        return [(name, value) for name, values in as_list.items() for value in values]
    return list(headers.get_all())


def field_lines(headers: httputil.HTTPHeaders) -> List[str]:
    """``["Name: value", ...]`` in ``get_all()`` order (one list comprehension, no generator
    per field)."""
    as_list = getattr(headers, "_as_list", None)
    if FAST and isinstance(as_list, dict):
        return ["%s: %s" % (name, value) for name, values in as_list.items() for value in values]
    return ["%s: %s" % field for field in headers.get_all()]


def parse_header_block(text: str) -> httputil.HTTPHeaders:
    """``HTTPHeaders.parse(text)`` for the field lines of a message head (CRLF or LF line
    ends, no start line): one pass of two regular expressions over the block instead of two
    per field. Anything unusual is handed to ``HTTPHeaders.parse``."""
    body = text.strip("\r\n")
    if not body:
        return httputil.HTTPHeaders()
    if FAST and not _FORBIDDEN.search(body):
        fields = _FIELD.findall(body)
        # Every line must have been exactly one field.
        if len(fields) == body.count("\n") + 1:
            as_list: Dict[str, List[str]] = {}
            for name, value in fields:
                norm = _normalize(name)
                values = as_list.get(norm)
                if values is None:
                    as_list[norm] = [value]
                else:
                    values.append(value)
            return _build(httputil.HTTPHeaders, as_list)
    return httputil.HTTPHeaders.parse(text)
