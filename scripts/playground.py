"""The playground's web server: serves the static chat page and proxies the
API to the local functions from the same origin (no CORS needed).

    python3 scripts/playground.py --listen 127.0.0.1:8080 --root playground \
        --functions http://127.0.0.1:9000/lambda-url

`/api/<function>/<path>` goes to `<functions>/<function>/<path>` for the
functions `chat-turn` and `provision`; responses (Server-Sent Events
included) are passed through as they arrive. Loopback only; standard library
only.
"""

import argparse
import http.client
import http.server
import sys
import urllib.parse

FUNCTIONS = ("chat-turn", "provision")
PASS_REQUEST = ("content-type", "accept", "idempotency-key")
PASS_RESPONSE = ("content-type", "retry-after", "cache-control")
MAX_BODY = 1 << 20


class Handler(http.server.SimpleHTTPRequestHandler):
    # HTTP/1.0: a proxied stream ends when the connection closes, no chunking.
    protocol_version = "HTTP/1.0"
    upstream = None  # urllib.parse.SplitResult of --functions

    def log_message(self, fmt, *args):
        sys.stderr.write("playground: " + (fmt % args) + "\n")

    def end_headers(self):
        self.send_header("Cache-Control", "no-store")
        super().end_headers()

    def do_GET(self):
        if self.path.startswith("/api/"):
            return self.proxy()
        return super().do_GET()

    def do_POST(self):
        return self.proxy()

    def do_PUT(self):
        return self.proxy()

    def proxy(self):
        parts = self.path.split("/", 3)  # "", "api", function, rest
        if len(parts) < 4 or parts[1] != "api" or parts[2] not in FUNCTIONS:
            return self.send_error(404, "no such route")
        try:
            length = int(self.headers.get("content-length") or 0)
        except ValueError:
            return self.send_error(400, "bad content-length")
        if length < 0 or length > MAX_BODY:
            return self.send_error(413, "body too large")
        body = self.rfile.read(length) if length else None
        up = self.upstream
        conn = http.client.HTTPConnection(up.hostname, up.port, timeout=600)
        headers = {k: self.headers[k] for k in PASS_REQUEST if self.headers.get(k)}
        try:
            conn.request(self.command, f"{up.path}/{parts[2]}/{parts[3]}", body, headers)
            resp = conn.getresponse()
        except OSError as e:
            return self.send_error(502, f"the local functions did not answer: {e}")
        self.send_response(resp.status)
        for k in PASS_RESPONSE:
            if resp.getheader(k):
                self.send_header(k, resp.getheader(k))
        self.end_headers()
        try:
            while True:
                chunk = resp.read1(65536)
                if not chunk:
                    break
                self.wfile.write(chunk)
                self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            pass  # the page went away; the turn goes on upstream
        finally:
            conn.close()


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--listen", default="127.0.0.1:8080")
    p.add_argument("--root", required=True)
    p.add_argument("--functions", required=True, help="e.g. http://127.0.0.1:9000/lambda-url")
    a = p.parse_args()
    host, port = a.listen.rsplit(":", 1)
    Handler.upstream = urllib.parse.urlsplit(a.functions.rstrip("/"))

    def handler(*args, **kw):
        return Handler(*args, directory=a.root, **kw)

    server = http.server.ThreadingHTTPServer((host, int(port)), handler)
    server.daemon_threads = True
    server.serve_forever()


if __name__ == "__main__":
    main()
