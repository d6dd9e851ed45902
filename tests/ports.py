"""Free TCP ports on 127.0.0.1 for tests that start real servers.

The kernel may hand out the same ephemeral port again as soon as the probing socket is
closed, so two calls in a row can return the same number (then the gateway and its child
collide). ``free_port()`` never returns a port it already gave out in this test run.
"""
import socket
import threading

_given: set = set()
_lock = threading.Lock()


def free_port() -> int:
    with _lock:
        while True:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                sock.bind(("127.0.0.1", 0))
                port = sock.getsockname()[1]
            if port not in _given:
                _given.add(port)
                return port


def free_ports(count: int) -> int:
    """The first of ``count`` consecutive free ports (a gateway's workers listen on
    FLASK_PORT, FLASK_PORT+1...), none given out before in this test run."""
    with _lock:
        while True:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                sock.bind(("127.0.0.1", 0))
                first = sock.getsockname()[1]
            block = range(first, first + count)
            if first + count > 65535 or any(p in _given for p in block):
                continue
            if all(_bindable(p) for p in block[1:]):
                _given.update(block)
                return first


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False
