"""A healthy child that ignores SIGTERM, with a grandchild (same process group) that ignores it
too. Only a kill of the whole tree ends them."""
import argparse
import http.server
import json
import os
import signal
import subprocess
import sys
import time

signal.signal(signal.SIGTERM, signal.SIG_IGN)
if "--grandchild" in sys.argv:
    while True:
        time.sleep(1)


class Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):
        body = json.dumps({"training_samples": 0, "model_loaded": True, "last_updated": None,
                           "grandchild": GRANDCHILD.pid}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


parser = argparse.ArgumentParser()
parser.add_argument("--host", default="127.0.0.1")
parser.add_argument("--port", type=int, default=5001)
args = parser.parse_args()
GRANDCHILD = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--grandchild"])
print("stubborn child %d with grandchild %d" % (os.getpid(), GRANDCHILD.pid), flush=True)
http.server.ThreadingHTTPServer((args.host, args.port), Handler).serve_forever()
