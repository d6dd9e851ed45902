"""A child that listens but answers 500 to its health check, forever."""
import argparse
import http.server


class Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):
        body = b'{"error": "not ready"}'
        self.send_response(500)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


parser = argparse.ArgumentParser()
parser.add_argument("--host", default="127.0.0.1")
parser.add_argument("--port", type=int, default=5001)
args = parser.parse_args()
print("never-healthy child listening on %d" % args.port, flush=True)
http.server.ThreadingHTTPServer((args.host, args.port), Handler).serve_forever()
