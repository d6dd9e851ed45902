"""A well-behaved child: serves the health contract, logs on both streams, exits 0 on SIGTERM.

Output (what the log-forwarding tests look for):
  stdout: ``healthy: listening on HOST:PORT`` once it accepts connections, then
          ``healthy: stdout line 1..3``
  stderr: ``healthy: stderr line 1..3`` and ``healthy: bad bytes <ff fe> end`` (invalid UTF-8)
  at SIGTERM: ``healthy: got SIGTERM`` on stdout, then ``healthy: partial last line`` on stdout
          WITHOUT a newline, then exit code 0.
It exits by itself when the process in ``TORNADO_GATEWAY_PID`` disappears.
"""
import os
import signal
import sys

from _childlib import make_server, parse_args, say, watch_gateway


def main() -> None:
    args = parse_args()
    server = make_server(args)

    def on_term(_sig, _frame):
        say("healthy: got SIGTERM")
        sys.stdout.write("healthy: partial last line")  # no newline: flushed only at EOF
        sys.stdout.flush()
        os._exit(0)

    signal.signal(signal.SIGTERM, on_term)
    watch_gateway()
    say("healthy: listening on %s:%d" % (args.host, server.server_address[1]))
    for i in range(1, 4):
        say("healthy: stdout line %d" % i)
        say("healthy: stderr line %d" % i, sys.stderr)
    sys.stderr.buffer.write(b"healthy: bad bytes \xff\xfe end\n")
    sys.stderr.flush()
    server.serve_forever()


if __name__ == "__main__":
    main()
