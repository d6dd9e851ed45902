"""Healthy until it crashes: prints a traceback-like message to stderr and exits with code 3.

It crashes ``CRASH_AFTER`` seconds after it starts listening (env, default: never), or when it
receives ``GET /api/deepfake/crash``.
"""
import os
import sys
import threading
import time

from _childlib import Handler, env_float, make_server, parse_args, say, watch_gateway


def crash(reason: str) -> None:
    say("Traceback (most recent call last):", sys.stderr)
    say('  File "crasher.py", line 1, in <module>', sys.stderr)
    say("RuntimeError: crashing on purpose (%s)" % reason, sys.stderr)
    sys.stdout.flush()
    os._exit(3)


def on_crash_request(handler) -> bool:
    handler._send(200, {"crashing": True})
    handler.wfile.flush()
    threading.Thread(target=lambda: (time.sleep(0.05), crash("crash requested")),
                     daemon=True).start()
    return True


def main() -> None:
    args = parse_args()
    Handler.routes = {"/api/deepfake/crash": on_crash_request}
    server = make_server(args)
    watch_gateway()
    say("crasher: listening on %s:%d" % (args.host, server.server_address[1]))
    after = env_float("CRASH_AFTER", 0.0)
    if after > 0:
        threading.Timer(after, crash, args=("after %g s" % after,)).start()
    server.serve_forever()


if __name__ == "__main__":
    main()
