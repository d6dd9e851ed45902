"""A Flask app run the way a developer often runs one: ``debug=True, use_reloader=True``.

The process the gateway spawns is then only Werkzeug's reloader; it re-runs this script as a
grandchild (``WERKZEUG_RUN_MAIN=true``) and that grandchild serves the port. Killing only the
direct child leaves the grandchild serving: the orphan case the gateway must handle. The
reloader does not watch ``TORNADO_GATEWAY_PID`` on purpose.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _childlib import STATS, parse_args  # noqa: E402

from flask import Flask, jsonify  # noqa: E402

app = Flask(__name__)


@app.get("/api/deepfake/stats")
def stats():
    return jsonify(dict(STATS, pid=os.getpid()))


if __name__ == "__main__":
    args = parse_args()
    role = "server" if os.environ.get("WERKZEUG_RUN_MAIN") == "true" else "reloader"
    print("reloader_app: %s pid %d" % (role, os.getpid()), flush=True)
    app.run(host=args.host, port=args.port, debug=True, use_reloader=True,
            reloader_type="stat")
