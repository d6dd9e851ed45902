"""logpump: line splitting, the [Python] prefix, and the pump threads on real OS pipes."""
import io
import logging
import os
import threading

import pytest

from tornado_gateway.supervisor.logpump import (PREFIX, LineSplitter, LogLine, LogPump, format_line,
                                     log_sink)


def test_prefix_and_format():
    assert PREFIX == "[Python] "
    assert format_line(LogLine("stderr", "Running on http://127.0.0.1:5001")) == \
        "[Python] Running on http://127.0.0.1:5001"


def test_splitter_keeps_partial_lines_until_newline():
    sp = LineSplitter()
    assert sp.feed(b"hel") == []
    assert sp.feed(b"lo\nwor") == ["hello"]
    assert sp.feed(b"ld\n\nx") == ["world", ""]
    assert sp.finish() == ["x"]
    assert sp.finish() == []


def test_splitter_strips_crlf_but_keeps_lone_cr():
    sp = LineSplitter()
    assert sp.feed(b"a\r\nprogress 10%\rprogress 20%\n") == ["a", "progress 10%\rprogress 20%"]
    assert sp.feed(b"b\r") == []
    assert sp.feed(b"\n") == ["b"]


def test_splitter_decodes_utf8_split_across_chunks():
    data = "naïve → ✓\n".encode("utf-8")
    sp = LineSplitter()
    out = []
    for i in range(len(data)):
        out += sp.feed(data[i:i + 1])
    assert out == ["naïve → ✓"]


def test_splitter_replaces_invalid_bytes():
    sp = LineSplitter()
    assert sp.feed(b"bad \xff\xfe byte\n") == ["bad \ufffd\ufffd byte"]
    assert sp.feed(b"cut \xe2\x86") == []
    assert sp.finish() == ["cut \ufffd"]


def pump_pipe(chunks, stream="stdout", chunk_size=65536, sink=None):
    r, w = os.pipe()
    got = []
    pump = LogPump(os.fdopen(r, "rb"), stream, sink or got.append, chunk_size=chunk_size).start()
    with os.fdopen(w, "wb") as wf:
        for c in chunks:
            wf.write(c)
            wf.flush()
    assert pump.join(5.0)
    return got, pump


def test_pump_forwards_lines_with_stream_and_flushes_tail_at_eof():
    got, pump = pump_pipe([b"one\ntw", b"o\nthree"], stream="stderr")
    assert got == [LogLine("stderr", "one"), LogLine("stderr", "two"),
                   LogLine("stderr", "three")]
    assert list(pump.tail) == ["one", "two", "three"]


def test_pump_small_reads():
    got, _ = pump_pipe([b"abcdef\nghij\n"], chunk_size=3)
    assert [l.text for l in got] == ["abcdef", "ghij"]


def test_pump_tail_is_bounded_and_shared():
    import collections

    tail = collections.deque(maxlen=3)
    r, w = os.pipe()
    pump = LogPump(os.fdopen(r, "rb"), "stderr", lambda l: None, tail=tail).start()
    with os.fdopen(w, "wb") as wf:
        wf.write(b"".join(b"%d\n" % i for i in range(10)))
    assert pump.join(5.0)
    assert pump.tail is tail and list(tail) == ["7", "8", "9"]


def test_broken_sink_does_not_stop_the_pump(caplog):
    seen = []

    def sink(line):
        seen.append(line.text)
        if line.text == "boom":
            raise RuntimeError("sink broke")

    with caplog.at_level(logging.ERROR, logger="tornado_gateway"):
        got, pump = pump_pipe([b"a\nboom\nb\n"], sink=sink)
    assert seen == ["a", "boom", "b"]
    assert any("log sink failed" in r.getMessage() for r in caplog.records)


def test_pump_closes_the_pipe():
    r, w = os.pipe()
    pipe = os.fdopen(r, "rb")
    os.close(w)
    pump = LogPump(pipe, "stdout", lambda l: None).start()
    assert pump.join(5.0)
    assert pipe.closed


def test_pump_reads_a_file_object_without_a_real_descriptor():
    # a pipe-like object whose fileno() is unsupported (BytesIO, wrapped streams) is read with
    # .read(), not taken for an immediate EOF
    got = []
    pump = LogPump(io.BytesIO(b"first\nsecond\n"), "stdout", got.append).start()
    assert pump.join(5.0)
    assert [l.text for l in got] == ["first", "second"]


def test_pump_reads_an_object_without_fileno():
    class Reader:
        def __init__(self, data):
            self.data = [data]

        def read(self, n):
            return self.data.pop() if self.data else b""

        def close(self):
            pass

    got = []
    pump = LogPump(Reader(b"x\ny"), "stdout", got.append).start()
    assert pump.join(5.0)
    assert [l.text for l in got] == ["x", "y"]


def test_pump_runs_on_a_daemon_thread():
    r, w = os.pipe()
    pump = LogPump(os.fdopen(r, "rb"), "stdout", lambda l: None).start()
    assert pump._thread.daemon and pump._thread is not threading.current_thread()
    assert pump.join(0.05) is False  # blocked on the open pipe, not on the caller
    os.close(w)
    assert pump.join(5.0)


def test_log_sink_logs_prefixed_line_at_info(caplog):
    with caplog.at_level(logging.INFO, logger="tornado_gateway.python"):
        log_sink(LogLine("stderr", "Traceback (most recent call last):"))
        log_sink(LogLine("stdout", "100% done %s %d"))
    msgs = [(r.name, r.levelno, r.getMessage()) for r in caplog.records]
    assert ("tornado_gateway.python", logging.INFO,
            "[Python] Traceback (most recent call last):") in msgs
    assert ("tornado_gateway.python", logging.INFO, "[Python] 100% done %s %d") in msgs


def test_splitter_forwards_an_overlong_line_in_pieces():
    sp = LineSplitter(max_line=4)
    assert sp.feed(b"abcdefghij") == ["abcd", "efgh"]
    assert sp.feed(b"k\nxy") == ["ijk"]
    assert sp.finish() == ["xy"]
    assert LineSplitter.MAX_LINE == 65536


@pytest.mark.timeout(60)
def test_output_without_newlines_is_pumped_in_linear_time():
    # 40 MiB with no newline (a blob on stdout) used to be re-split on every read: quadratic,
    # minutes of CPU while the pipe stayed full and the child's writes blocked
    size = 40 * 1024 * 1024
    got = []
    r, w = os.pipe()
    pump = LogPump(os.fdopen(r, "rb"), "stdout", got.append).start()

    def writer():
        with os.fdopen(w, "wb") as wf:
            for _ in range(size // 65536):
                wf.write(b"x" * 65536)

    import time

    t0 = time.monotonic()
    t = threading.Thread(target=writer)
    t.start()
    t.join(30)
    assert pump.join(30)
    took = time.monotonic() - t0
    assert not t.is_alive() and took < 5.0  # quadratic: ~20 s here
    assert sum(len(l.text) for l in got) == size
    assert max(len(l.text) for l in got) <= LineSplitter.MAX_LINE


def test_colour_codes_are_kept_on_a_terminal_only_and_never_in_the_crash_tail():
    coloured = "\x1b[31m\x1b[1mGET /x HTTP/1.1\x1b[0m 500 -"
    line = LogLine("stderr", coloured)
    assert format_line(line, colours=True) == PREFIX + coloured
    assert format_line(line, colours=False) == PREFIX + "GET /x HTTP/1.1 500 -"
    got, pump = pump_pipe([coloured.encode() + b"\n"], stream="stderr")
    assert got == [line]  # the sink decides; the line itself is untouched
    assert list(pump.tail) == ["GET /x HTTP/1.1 500 -"]


def test_log_sink_strips_colours_when_the_log_is_not_a_terminal(caplog, monkeypatch):
    import io
    import sys

    monkeypatch.setattr(sys, "stderr", io.StringIO())  # not a TTY (redirected to a file)
    with caplog.at_level("INFO", logger="tornado_gateway.python"):
        log_sink(LogLine("stderr", "\x1b[33mwarning\x1b[0m"))
    assert caplog.records[-1].getMessage() == PREFIX + "warning"
