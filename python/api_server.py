#!/usr/bin/env python
"""Entry point of the deepfake-detection service that the Tornado gateway runs as its child.

    python python/api_server.py [--host 127.0.0.1] [--port 5001]
                                [--env development|production] [--data-dir DIR] [--reload]

Development: Flask's server with debug on (tracebacks in the log, never in responses; the
interactive debugger is never enabled). Production: waitress. Runnable from any directory.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

from deepfake.config import DEVELOPMENT, PRODUCTION, load_config
from deepfake.parent_watch import watch_from_environment

log = logging.getLogger("deepfake.server")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Deepfake detection service (Flask).")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=5001)
    parser.add_argument("--env", choices=(DEVELOPMENT, PRODUCTION), default=None,
                        help="default: $GATEWAY_ENV, then $NODE_ENV, else development")
    parser.add_argument("--data-dir", default=None,
                        help="default: $DEEPFAKE_DATA_DIR, else python/data next to this script")
    parser.add_argument("--reload", action="store_true",
                        help="development only: restart on code changes (slower start)")
    return parser.parse_args(argv)


# what the gateway's health checks send; their 2xx answers are not logged (one every 500 ms)
HEALTH_PROBE_AGENT = "tornado_gateway-health"


def quiet_health_checks_handler():
    """Werkzeug's request handler, minus the access-log line of each successful health check."""
    from werkzeug.serving import WSGIRequestHandler

    class QuietHealthChecks(WSGIRequestHandler):
        def log_request(self, code: object = "-", size: object = "-") -> None:
            if (str(code).startswith("2")
                    and self.headers.get("User-Agent", "").startswith(HEALTH_PROBE_AGENT)):
                return
            super().log_request(code, size)

    return QuietHealthChecks


def main(argv: list[str] | None = None) -> int:
    # under the gateway every line already gets a timestamp and the [Python] prefix
    under_gateway = bool(os.environ.get("TORNADO_GATEWAY_PID"))
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format=("" if under_gateway else "%(asctime)s ")
                        + "%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    config = load_config(data_dir=args.data_dir, env=args.env)
    watch_from_environment()

    from deepfake import imaging
    from deepfake.app import create_app

    imaging.set_pixel_limit(config.max_pixels)  # Pillow's, process-wide: this process is ours
    app = create_app(config)
    url = "http://%s:%d" % (args.host, args.port)
    if config.env == PRODUCTION:
        import waitress

        from deepfake.waitress_errors import use_json_errors

        # waitress reads (and spools) the whole body before calling the app, so its own limit
        # is the service's upload limit plus room for multipart framing; above it waitress
        # refuses the body unread, with our JSON error shape
        try:
            server = use_json_errors(waitress.create_server(
                app, host=args.host, port=args.port, threads=config.waitress_threads,
                max_request_body_size=config.max_upload + 2**20))
        except OSError as exc:
            log.error("cannot listen on %s: %s (is another service using the port?)", url, exc)
            return 1
        log.info("deepfake service listening on %s (production, waitress, data in %s)",
                 url, config.data_dir)
        server.run()
    else:
        log.info("deepfake service listening on %s (development, Flask debug server, data "
                 "in %s)", url, config.data_dir)
        app.run(host=args.host, port=args.port, debug=True, use_debugger=False,
                use_reloader=args.reload, threaded=True,
                request_handler=quiet_health_checks_handler())
    return 0


if __name__ == "__main__":
    sys.exit(main())
