"""Healthy, but ignores SIGTERM (like a server stuck in a long request): only SIGKILL ends it."""
import signal

from _childlib import make_server, parse_args, say, watch_gateway


def main() -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    args = parse_args()
    server = make_server(args)
    watch_gateway()
    say("ignores_sigterm: listening on %s:%d (SIGTERM is ignored)" % (
        args.host, server.server_address[1]))
    server.serve_forever()


if __name__ == "__main__":
    main()
