"""Framing rules the gateway decides itself, written once.

The parser (llhttp, through httptools) reads every message head and body: where a head ends,
Content-Length and chunked bodies, bare CRs, the ``Connection`` token list, ambiguous framing
(Content-Length with Transfer-Encoding, repeated lengths). What is left to the gateway is
decided here, and only here:

* which requests the proxy refuses before the child is contacted (:func:`check_framing`):
  the server refuses them already when llhttp reads them, but the proxy also runs on
  Tornado's own ``HTTPServer`` in applications that embed it;
* how a response body is framed on a given connection (:func:`response_framing`), and from
  that whether the connection can stay open after the exchange
  (:func:`keeps_alive_after`).

Plain functions of plain values: tested without sockets (``tests/http/test_framing.py``).
"""
from __future__ import annotations

import enum
import re
from typing import Optional

from tornado import httputil

from .. import errors
from ..errors import GatewayError
from .headers import get_field

_DIGITS = re.compile(r"^[0-9]+$")

#: Statuses whose responses never have a body (RFC 9112 6.3), whatever their headers say.
_NO_BODY_STATUS = frozenset({204, 304})


# --- requests: refused before the child is contacted ---------------------------------------

def check_framing(headers: httputil.HTTPHeaders) -> Optional[GatewayError]:
    """The error to answer for a request whose body framing is ambiguous, or None.

    The gateway's server never hands such a request to the application (llhttp refuses it
    while reading the head). Under Tornado's ``HTTPServer`` the same rules apply only when the
    body is read: after ``prepare()`` has opened the upstream exchange, so without this check
    the child could act on a request the gateway then refuses. Refused: Content-Length
    together with Transfer-Encoding, any Transfer-Encoding other than one ``chunked``, and
    Content-Length values that are not plain digits or that are repeated.
    """
    encodings = headers.get_list("Transfer-Encoding")
    lengths = headers.get_list("Content-Length")
    if encodings and lengths:
        return errors.ambiguous_framing("both Content-Length and Transfer-Encoding")
    if encodings and (len(encodings) != 1 or encodings[0].strip().lower() != "chunked"):
        return errors.ambiguous_framing("Transfer-Encoding must be exactly 'chunked'")
    if len(lengths) > 1 or (lengths and not _DIGITS.match(lengths[0].strip())):
        return errors.ambiguous_framing("Content-Length must be one number")
    return None


def declared_length(headers: httputil.HTTPHeaders) -> Optional[int]:
    """The request's Content-Length as an int, or None when absent or not one number."""
    value = get_field(headers, "Content-Length")
    if value is None or not _DIGITS.match(value.strip()):
        return None
    return int(value)


def has_request_body(headers: httputil.HTTPHeaders) -> bool:
    """True when the request carries body bytes (Content-Length > 0, or chunked)."""
    if get_field(headers, "Transfer-Encoding") is not None:
        return True
    length = declared_length(headers)
    return bool(length and length > 0)


def request_must_close(version: str, headers: httputil.HTTPHeaders) -> bool:
    """True when the connection must close after this request whatever its ``Connection``
    header says: an HTTP/1.0 request with a Transfer-Encoding (RFC 9112 6.1)."""
    return version == "HTTP/1.0" and get_field(headers, "Transfer-Encoding") is not None


# --- responses: how the body is framed, whether the connection stays ----------------------

class Framing(enum.Enum):
    """How a response body is delimited on the wire."""

    NONE = "none"  # no body: HEAD, 1xx, 204, 304
    LENGTH = "length"  # Content-Length
    CHUNKED = "chunked"  # Transfer-Encoding: chunked (HTTP/1.1 clients only)
    UNTIL_CLOSE = "until-close"  # the connection's end ends the body


def response_framing(request_method: str, request_version: str, status: int,
                     headers: httputil.HTTPHeaders) -> Framing:
    """How the server frames a response to a request of ``request_version``.

    A response that has no body by its method or status has none, whatever its headers say;
    a Content-Length (a valid one: the application's own) frames the rest; without one, an
    HTTP/1.1 client gets chunked encoding and an HTTP/1.0 client (which does not know it)
    gets a body that ends with the connection.
    """
    if request_method == "HEAD" or status < 200 or status in _NO_BODY_STATUS:
        return Framing.NONE
    if get_field(headers, "Content-Length") is not None:
        return Framing.LENGTH
    if request_version == "HTTP/1.1":
        return Framing.CHUNKED
    return Framing.UNTIL_CLOSE


def keeps_alive_after(request_keep_alive: bool, framing: Framing,
                      response_headers: httputil.HTTPHeaders) -> bool:
    """Whether the connection stays open after this exchange.

    ``request_keep_alive`` is the parser's verdict on the request (version, the
    ``Connection`` token list, and :func:`request_must_close` applied by the caller). A body
    delimited by the connection's end, or a response saying ``Connection: close``, ends it.
    """
    if not request_keep_alive or framing is Framing.UNTIL_CLOSE:
        return False
    return "close" not in connection_tokens(response_headers)


def connection_tokens(headers: httputil.HTTPHeaders) -> frozenset:
    """The lower-cased tokens of every ``Connection`` field (a comma-separated list)."""
    return frozenset(token.strip().lower()
                     for value in headers.get_list("Connection")
                     for token in value.split(",") if token.strip())


# --- client side: requests the proxy's HTTP client sends, responses it reads --------------
# (tornado_gateway/http/client.py; llhttp parses the responses, these are the rules it leaves
# to the client)

#: Methods whose request without a body still says so (``Content-Length: 0``): a server must
#: not have to guess whether a POST, PUT or PATCH has a body (RFC 9110 8.6).
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})


def request_body_framing(method: str, headers: httputil.HTTPHeaders, body_length: Optional[int],
                         streamed: bool) -> Optional[tuple[str, str]]:
    """The framing header the client adds to a request, or None when it adds none.

    ``body_length`` is the length of a body in hand (None: no body in hand), ``streamed``
    whether a body producer makes the body. A body in hand is sent with its
    ``Content-Length``; a streamed body with the caller's ``Content-Length`` or
    ``Transfer-Encoding`` (the caller then frames it) or else chunked by the client; a POST,
    PUT or PATCH without any body says ``Content-Length: 0``. No other method gets a framing
    header it did not ask for.
    """
    if body_length is not None:
        return ("Content-Length", str(body_length))
    if not streamed and method not in _BODY_METHODS:
        return None  # (the common GET: no header look-up)
    if get_field(headers, "Content-Length") is not None or \
            get_field(headers, "Transfer-Encoding") is not None:
        return None
    return ("Transfer-Encoding", "chunked") if streamed else ("Content-Length", "0")


def upstream_response_framing(request_method: str, status: int,
                              headers: httputil.HTTPHeaders) -> Framing:
    """How a response read from upstream is delimited, as llhttp reads it (RFC 9112 6.3).

    No body for HEAD, 1xx, 204 and 304 whatever the headers say; else chunked when the last
    transfer coding is ``chunked``, the Content-Length, and otherwise (no length, or a last
    coding that is not ``chunked``) the connection's end. ``UNTIL_CLOSE`` is what the client
    must know: llhttp never ends such a body itself (the client ends it at EOF), and the
    connection is not reused after it.
    """
    if request_method == "HEAD" or status < 200 or status in _NO_BODY_STATUS:
        return Framing.NONE
    encodings = get_field(headers, "Transfer-Encoding")
    if encodings is not None:
        last = encodings.rsplit(",", 1)[-1].strip().lower()
        return Framing.CHUNKED if last == "chunked" else Framing.UNTIL_CLOSE
    if get_field(headers, "Content-Length") is not None:
        return Framing.LENGTH
    return Framing.UNTIL_CLOSE


def upstream_response_error(status: int, headers: httputil.HTTPHeaders) -> Optional[str]:
    """Why a response head llhttp accepted is refused all the same, or None.

    A 1xx response with body framing headers, and a 204 announcing a body: llhttp reads
    both as bodiless, and the bytes such a server then sends would be taken for the next
    response on the connection. (Tornado's clients refuse them, in these words.)
    """
    if status < 200:
        if get_field(headers, "Content-Length") is not None or \
                get_field(headers, "Transfer-Encoding") is not None:
            return "Response code %d cannot have body" % status
    elif status == 204:
        length = get_field(headers, "Content-Length")
        if get_field(headers, "Transfer-Encoding") is not None or \
                (length is not None and length.strip() != "0"):
            return "Response with code 204 should not have body"
    return None
