"""Listens, but answers 500 to the health check forever."""
from _childlib import Handler, make_server, parse_args, say, watch_gateway


class Sick(Handler):
    health_status = 500


def main() -> None:
    args = parse_args()
    server = make_server(args, Sick)
    watch_gateway()
    say("never_healthy: listening on %s:%d (health check answers 500)" % (
        args.host, server.server_address[1]))
    server.serve_forever()


if __name__ == "__main__":
    main()
