"""The command line: ``python -m tornado_gateway`` / ``tornado-gateway``."""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from typing import List, Optional

from . import __version__
from .config import SETTINGS, describe_default, load_config


def _checked(name: str):
    """An argparse ``type`` that refuses a bad value (exit 2 with the usage line), keeping
    the raw text for load_config()."""
    from .config import check_value

    def check(raw: str) -> str:
        try:
            return check_value(name, raw)
        except ValueError as exc:
            raise argparse.ArgumentTypeError("invalid value %r: %s" % (raw, exc)) from None
    return check


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tornado-gateway",
        description="Run the deepfake service behind one front door: a Tornado gateway that "
                    "spawns python/api_server.py workers, watches them and proxies "
                    "/api/deepfake/* to them.",
        epilog="Every option also has an environment variable (in brackets); an option given "
               "here wins. A bad option is an error; a bad environment variable logs a "
               "warning and uses the default.")
    for name, setting in SETTINGS.items():
        parser.add_argument(setting.option, dest=name, metavar=setting.metavar, default=None,
                            type=_checked(name),
                            help="%s (default: %s) [%s]" % (setting.meaning,
                                                           describe_default(name),
                                                           setting.env))
    parser.add_argument("--mode", choices=["development", "production"], default=None,
                        help="development: Flask's debug server, verbose log; production: "
                             "waitress, warnings only (default: development) "
                             "[GATEWAY_ENV, then NODE_ENV]")
    parser.add_argument("--production", dest="mode", action="store_const", const="production",
                        help="same as --mode production")
    parser.add_argument("--version", action="version", version="%(prog)s " + __version__)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        # started as a script's background job: Ctrl+C / kill -INT must still stop it, also
        # before serve() installs its own handlers
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        return _main(argv)
    except KeyboardInterrupt:
        # Ctrl+C before run() handles it (while Tornado and the gateway are imported, about
        # 0.2 s): nothing has been started, so this is a normal stop.
        return 0


def _main(argv: Optional[List[str]]) -> int:
    args = build_parser().parse_args(argv)
    overrides = {k: v for k, v in vars(args).items() if v is not None}
    from .server import configure_logging, run, shutdown_signals

    warnings: List[str] = []
    config = load_config(os.environ, overrides, warn=warnings.append)
    configure_logging(config.mode)
    log = logging.getLogger("tornado_gateway.config")
    for message in warnings:
        log.warning(message)
    try:
        return run(config)
    finally:
        # only exiting is left: a late Ctrl+C / SIGTERM must not turn exit 0 into 130 / -15
        for sig in shutdown_signals():
            signal.signal(sig, signal.SIG_IGN)


if __name__ == "__main__":
    sys.exit(main())
