"""tornado_gateway.headers: the cheaper HTTPHeaders constructions must mean exactly what
Tornado's own do (same fields, same order, same refusals)."""
from __future__ import annotations

import pytest
from hypothesis import given, settings, strategies as st
from tornado import httputil

from tornado_gateway.http import headers as fast

TOKEN = st.text(alphabet="!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ",
                min_size=1, max_size=12)
VALUE = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0xFF), max_size=30)
# Also anything at all, so that malformed lines (controls, folding, no colon) are covered.
ANY_LINE = st.text(alphabet=st.characters(min_codepoint=0, max_codepoint=0xFF), max_size=30)


def outcome(parse, text):
    try:
        return ("ok", list(parse(text).get_all()))
    except httputil.HTTPInputError:
        return ("refused", None)


@st.composite
def header_blocks(draw):
    lines = draw(st.lists(st.one_of(
        st.builds(lambda n, sp, v, tail: "%s:%s%s%s" % (n, sp, v, tail), TOKEN,
                  st.sampled_from(["", " ", "\t", "  "]), VALUE, st.sampled_from(["", " ", "\t"])),
        ANY_LINE,
        st.builds(lambda n, v: "%s:%s" % (n, v), ANY_LINE, ANY_LINE),  # any name at all
    ), max_size=8))
    eol = draw(st.sampled_from(["\r\n", "\n"]))
    lead = draw(st.sampled_from(["", eol]))
    trail = draw(st.sampled_from(["", eol, eol + eol]))
    return lead + eol.join(lines) + trail


@settings(max_examples=500, deadline=None)
@given(text=header_blocks())
def test_parse_header_block_is_httpheaders_parse(text):
    assert outcome(fast.parse_header_block, text) == outcome(httputil.HTTPHeaders.parse, text)


@pytest.mark.parametrize("text", [
    "Content-Type: text/plain\r\nSet-Cookie: a=1\r\nSet-Cookie: b=2\r\ncontent-length: 3",
    "X-Empty:\r\nX-Spaces:   padded \t \r\n",
    "",
    "\r\n",
])
def test_known_blocks(text):
    assert outcome(fast.parse_header_block, text) == outcome(httputil.HTTPHeaders.parse, text)


@pytest.mark.parametrize("text", [
    "Bad Name: x",         # space in the name
    "X-Folded: a\r\n b",   # obs-fold: refused by Tornado 6.6
    "X-Ctl: a\x01b",       # control character in the value
    "X-CR: a\rb",          # bare CR
    "no colon here",
])
def test_malformed_blocks_are_refused_like_tornado(text):
    assert outcome(fast.parse_header_block, text) == ("refused", None)
    assert outcome(httputil.HTTPHeaders.parse, text) == ("refused", None)


@settings(max_examples=200, deadline=None)
@given(pairs=st.lists(st.tuples(TOKEN, VALUE.map(str.strip)), max_size=8))
def test_copies_and_field_lists_equal_the_public_api(pairs):
    slow = httputil.HTTPHeaders()
    for name, value in pairs:
        try:
            slow.add(name, value)
        except httputil.HTTPInputError:
            return  # not a valid field: nothing to copy
    copy = fast.copy_headers(slow)
    assert list(copy.get_all()) == list(slow.get_all())
    copy.add("X-Only-In-Copy", "1")  # the copy is independent of the original
    assert "X-Only-In-Copy" not in slow
    assert fast.field_lines(slow) == ["%s: %s" % f for f in slow.get_all()]
    assert fast.fields(slow) == list(slow.get_all())
    for name in {n for n, _ in slow.get_all()} | {"X-Absent"}:
        assert fast.get_field(slow, name) == slow.get(name)
        assert fast.get_fields(slow, name) == slow.get_list(name)
    rebuilt = fast.headers_from_fields(slow.get_all())
    assert list(rebuilt.get_all()) == list(slow.get_all())
    for name in {n for n, _ in slow.get_all()}:
        assert rebuilt.get_list(name) == slow.get_list(name)
        assert rebuilt[name] == slow[name]


def test_empty_headers_behaves_like_a_new_httpheaders():
    h = fast.empty_headers()
    assert list(h.get_all()) == [] and "X" not in h
    h.add("x-a", "1")
    h["X-B"] = "2"
    assert list(h.get_all()) == [("X-A", "1"), ("X-B", "2")]


def test_the_private_layout_the_fast_path_reads_is_there():
    """tornado_gateway.http.headers reads HTTPHeaders' private ``_as_list`` and
    ``_combined_cache`` (Tornado 6.x), and falls back to the public API without them: this
    fails the day Tornado changes them, so the fallback (slower) never happens unnoticed."""
    assert fast.FAST
    headers = httputil.HTTPHeaders()
    headers.add("X-A", "1")
    headers.add("x-a", "2")
    assert headers._as_list == {"X-A": ["1", "2"]}  # type: ignore[attr-defined]
    built = fast.headers_from_fields([("X-A", "1"), ("X-A", "2")])  # names come normalized
    assert built.get_list("X-A") == ["1", "2"] and built["X-A"] == "1,2"
