"""Healthy, but only starts listening ``SLOW_START`` seconds (env, default 1.5) after launch."""
import time

from _childlib import env_float, make_server, parse_args, say, watch_gateway


def main() -> None:
    args = parse_args()
    watch_gateway()
    delay = env_float("SLOW_START", 1.5)
    say("slow_start: warming up for %g s" % delay)
    time.sleep(delay)
    server = make_server(args)
    say("slow_start: listening on %s:%d" % (args.host, server.server_address[1]))
    server.serve_forever()


if __name__ == "__main__":
    main()
