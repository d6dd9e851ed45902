"""Threads that forward the child's output into the gateway's log with the ``[Python] `` prefix.

One thread per pipe reads raw bytes, decodes them incrementally (UTF-8, invalid bytes
replaced), keeps partial lines until their newline arrives (or EOF), and hands each complete
line to a sink as a :class:`LogLine`. Threads, because a blocking read of a pipe must never
stall the IOLoop; ``logging`` is thread-safe, so the default sink logs straight from the thread.
"""
from __future__ import annotations

import codecs
import collections
import io
import logging
import os
import re
import sys
import threading
from typing import IO, Callable, Deque, List, NamedTuple, Optional

PREFIX = "[Python] "
child_log = logging.getLogger("tornado_gateway.python")

# ANSI escape sequences (colours, bold): Werkzeug colours its request lines even into a pipe
_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")


def strip_ansi(text: str) -> str:
    """``text`` without terminal escape sequences."""
    return _ANSI.sub("", text) if "\x1b" in text else text


def _stderr_is_terminal() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


class LogLine(NamedTuple):
    """One complete line of child output: the only contract between pumps and sinks."""

    stream: str  # "stdout" or "stderr"
    text: str


def format_line(line: LogLine, colours: Optional[bool] = None) -> str:
    """The line as the gateway logs it: prefixed, and without colour codes unless the log goes
    to a terminal (``colours``: None = decide from the gateway's stderr)."""
    if colours is None:
        colours = _stderr_is_terminal()
    return PREFIX + (line.text if colours else strip_ansi(line.text))


def log_sink(line: LogLine) -> None:
    """Default sink: every line at INFO on the ``tornado_gateway.python`` logger. The child
    writes its ordinary logs to stderr too, so the stream says nothing about severity; what
    the child prints is its own verbosity (debug server in development, quiet waitress in
    production), and a crash is reported separately at ERROR with the last stderr lines."""
    child_log.info("%s", format_line(line))


class LineSplitter:
    """Bytes in, complete lines out; holds the unfinished tail between calls."""

    # A longer line is forwarded in pieces of this many characters: output without newlines
    # (a blob, a binary dump) must neither grow without bound nor be re-split on every read,
    # which is quadratic, lets the pipe fill and blocks the child's writes.
    MAX_LINE = 65536

    def __init__(self, max_line: int = MAX_LINE) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._partial = ""
        self._max_line = max_line

    def feed(self, data: bytes) -> List[str]:
        # split on LF only: a lone CR (progress bars) or a form feed stays inside its line
        *lines, self._partial = (self._partial + self._decoder.decode(data)).split("\n")
        out = [ln[:-1] if ln.endswith("\r") else ln for ln in lines]
        while len(self._partial) > self._max_line:
            out.append(self._partial[:self._max_line])
            self._partial = self._partial[self._max_line:]
        return out

    def finish(self) -> List[str]:
        text = self._partial + self._decoder.decode(b"", final=True)
        self._partial = ""
        return [text[:-1] if text.endswith("\r") else text] if text else []


class LogPump:
    """Forwards one pipe of the child, line by line, on its own daemon thread."""

    def __init__(self, pipe: IO[bytes], stream: str,
                 sink: Callable[[LogLine], None] = log_sink,
                 tail: Optional[Deque[str]] = None, chunk_size: int = 65536) -> None:
        self._pipe = pipe
        self.stream = stream
        self._sink = sink
        # the last lines, kept for crash reports; deque appends are thread-safe
        self.tail: Deque[str] = tail if tail is not None else collections.deque(maxlen=50)
        self._chunk_size = chunk_size
        self._thread = threading.Thread(target=self._run, name="logpump-%s" % stream,
                                        daemon=True)

    def start(self) -> "LogPump":
        self._thread.start()
        return self

    def join(self, timeout: Optional[float] = None) -> bool:
        """Wait for EOF to be forwarded; True if the pump has finished."""
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def _emit(self, text: str) -> None:
        self.tail.append(strip_ansi(text))  # crash reports are read everywhere: no colours
        try:
            self._sink(LogLine(self.stream, text))
        except Exception:  # a broken sink must not kill the pump and block the child's pipe
            logging.getLogger("tornado_gateway").exception("log sink failed")

    def _read(self) -> bytes:
        fileno = getattr(self._pipe, "fileno", None)
        if fileno is not None:
            try:
                fd = fileno()
            except io.UnsupportedOperation:  # file-like without a descriptor (BytesIO)
                fd = None
            except (OSError, ValueError):
                return b""
            if fd is not None:
                try:
                    # os.read returns what is there now instead of waiting for a full chunk
                    return os.read(fd, self._chunk_size)
                except (OSError, ValueError):
                    return b""
        return self._pipe.read(self._chunk_size) or b""

    def _run(self) -> None:
        splitter = LineSplitter()
        try:
            while True:
                data = self._read()
                if not data:
                    break
                for text in splitter.feed(data):
                    self._emit(text)
        finally:
            for text in splitter.finish():
                self._emit(text)
            try:
                self._pipe.close()
            except OSError:
                pass
