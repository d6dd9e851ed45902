"""The command line: ``python -m tornado_gateway`` / ``tornado-gateway``."""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from typing import List, Optional

from . import __version__
from .config import SETTINGS, load_config


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tornado-gateway",
        description="Run the deepfake service behind one front door: a Tornado gateway that "
                    "spawns python/api_server.py, watches it and proxies /api/deepfake/* to it.",
        epilog="Every option also has an environment variable (shown in brackets). Times are "
               "in milliseconds. An invalid value logs a warning and uses the default.")
    for name, (var, option, _parse, _where) in SETTINGS.items():
        parser.add_argument(option, dest=name, metavar="VALUE", default=None,
                            help="[%s]" % var)
    parser.add_argument("--mode", choices=["development", "production"], default=None,
                        help="[GATEWAY_ENV, then NODE_ENV] default: development")
    parser.add_argument("--production", dest="mode", action="store_const", const="production",
                        help="same as --mode production")
    parser.add_argument("--version", action="version", version="%(prog)s " + __version__)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
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
