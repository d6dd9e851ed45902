"""The framing rules the gateway decides itself (tornado_gateway/http/framing.py): plain
functions, tested without sockets."""
from __future__ import annotations

import re

import pytest
from hypothesis import given, settings, strategies as st
from tornado import httputil

from tornado_gateway.http.framing import (Framing, check_framing, connection_tokens,
                                          declared_length, has_request_body, keeps_alive_after,
                                          request_must_close, response_framing)


def hdrs(*pairs) -> httputil.HTTPHeaders:
    headers = httputil.HTTPHeaders()
    for name, value in pairs:
        headers.add(name, value)
    return headers


# --- what the proxy refuses before contacting the child ----------------------------------

@pytest.mark.parametrize("pairs,refused", [
    ((), None),
    ((("Content-Length", "0"),), None),
    ((("Content-Length", "12"),), None),
    ((("Transfer-Encoding", "chunked"),), None),
    ((("Transfer-Encoding", "Chunked"),), None),
    ((("Content-Length", "5"), ("Transfer-Encoding", "chunked")), "both"),
    ((("Content-Length", "0"), ("Transfer-Encoding", "chunked")), "both"),
    ((("Transfer-Encoding", "gzip, chunked"),), "exactly"),
    ((("Transfer-Encoding", "chunked"), ("Transfer-Encoding", "chunked")), "exactly"),
    ((("Transfer-Encoding", "identity"),), "exactly"),
    ((("Content-Length", "5, 5"),), "one number"),
    ((("Content-Length", "5"), ("Content-Length", "5")), "one number"),
    ((("Content-Length", "5"), ("Content-Length", "6")), "one number"),
    ((("Content-Length", "-1"),), "one number"),
    ((("Content-Length", "+5"),), "one number"),
    ((("Content-Length", "0x10"),), "one number"),
    ((("Content-Length", ""),), "one number"),
])
def test_check_framing(pairs, refused):
    error = check_framing(hdrs(*pairs))
    if refused is None:
        assert error is None
    else:
        assert error is not None and error.status == 400 and refused in error.message


_LENGTHS = st.one_of(st.integers(0, 10 ** 12).map(str), st.sampled_from(
    ["", "7 7", "5, 5", "-3", "1e3", "0x1", "\xb2", "12a"]))
_ENCODINGS = st.sampled_from(["chunked", "Chunked", "CHUNKED", "gzip", "gzip, chunked",
                              "identity", "chunked, gzip", ""])


@settings(max_examples=500)
@given(st.lists(_LENGTHS, max_size=3), st.lists(_ENCODINGS, max_size=2))
def test_check_framing_accepts_exactly_one_unambiguous_framing(lengths, encodings):
    headers = hdrs(*([("Content-Length", v) for v in lengths]
                     + [("Transfer-Encoding", v) for v in encodings]))
    values_cl = headers.get_list("Content-Length")
    values_te = headers.get_list("Transfer-Encoding")
    one_length = len(values_cl) == 1 and re.fullmatch(r"[0-9]+", values_cl[0].strip()) \
        and values_cl[0].strip().isascii()
    one_chunked = len(values_te) == 1 and values_te[0].strip().lower() == "chunked"
    unambiguous = ((not values_cl and not values_te) or (one_length and not values_te)
                   or (one_chunked and not values_cl))
    assert (check_framing(headers) is None) == bool(unambiguous)


def test_declared_length_and_body():
    assert declared_length(hdrs()) is None
    assert declared_length(hdrs(("Content-Length", "42"))) == 42
    assert declared_length(hdrs(("Content-Length", "4x"))) is None
    assert not has_request_body(hdrs())
    assert not has_request_body(hdrs(("Content-Length", "0")))
    assert has_request_body(hdrs(("Content-Length", "1")))
    assert has_request_body(hdrs(("Transfer-Encoding", "chunked")))


def test_http10_with_a_transfer_encoding_must_close():
    assert request_must_close("HTTP/1.0", hdrs(("Transfer-Encoding", "chunked")))
    assert not request_must_close("HTTP/1.1", hdrs(("Transfer-Encoding", "chunked")))
    assert not request_must_close("HTTP/1.0", hdrs(("Content-Length", "3")))


# --- how a response body is framed, whether the connection stays -------------------------

@pytest.mark.parametrize("method,version,status,pairs,expected", [
    ("GET", "HTTP/1.1", 200, (("Content-Length", "3"),), Framing.LENGTH),
    ("GET", "HTTP/1.1", 200, (), Framing.CHUNKED),
    ("GET", "HTTP/1.0", 200, (), Framing.UNTIL_CLOSE),
    ("GET", "HTTP/1.0", 200, (("Content-Length", "3"),), Framing.LENGTH),
    ("HEAD", "HTTP/1.1", 200, (), Framing.NONE),
    ("HEAD", "HTTP/1.0", 200, (), Framing.NONE),
    ("GET", "HTTP/1.1", 204, (("Content-Length", "3"),), Framing.NONE),
    ("GET", "HTTP/1.0", 304, (), Framing.NONE),
    ("GET", "HTTP/1.1", 101, (), Framing.NONE),
    ("POST", "HTTP/1.1", 500, (), Framing.CHUNKED),
])
def test_response_framing(method, version, status, pairs, expected):
    assert response_framing(method, version, status, hdrs(*pairs)) is expected


@settings(max_examples=300)
@given(st.sampled_from(["GET", "HEAD", "POST", "PUT", "DELETE"]),
       st.sampled_from(["HTTP/1.0", "HTTP/1.1"]), st.integers(100, 599), st.booleans(),
       st.booleans(), st.booleans())
def test_a_body_that_ends_with_the_connection_never_keeps_it(method, version, status,
                                                              with_length, keep_alive,
                                                              says_close):
    response = hdrs(*([("Content-Length", "1")] if with_length else [])
                    + ([("Connection", "close")] if says_close else []))
    framing = response_framing(method, version, status, response)
    kept = keeps_alive_after(keep_alive, framing, response)
    if framing is Framing.UNTIL_CLOSE or not keep_alive or says_close:
        assert not kept
    else:
        assert kept
    # only an HTTP/1.0 client of a body without a length gets an unframed body
    assert (framing is Framing.UNTIL_CLOSE) == (
        version == "HTTP/1.0" and not with_length and method != "HEAD"
        and status >= 200 and status not in (204, 304))
    # chunked only for HTTP/1.1
    assert framing is not Framing.CHUNKED or version == "HTTP/1.1"


def test_connection_tokens_are_a_list():
    assert connection_tokens(hdrs(("Connection", "close, foo"))) == {"close", "foo"}
    assert connection_tokens(hdrs(("Connection", "Keep-Alive"), ("Connection", "Close ,")))\
        == {"keep-alive", "close"}
    assert connection_tokens(hdrs()) == frozenset()
    assert not keeps_alive_after(True, Framing.LENGTH, hdrs(("Connection", "keep-alive, close")))
