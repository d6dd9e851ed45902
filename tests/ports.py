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
