"""moto's DynamoDB-compatible server, serving one request at a time.

`moto_server` handles requests on threads with no lock between a condition
check and the write, so two concurrent conditional writes on one item can both
succeed — real DynamoDB never allows that. Tests of races (exactly-once
provisioning, leases) need per-item atomicity, so tests and local runs use
this single-threaded launcher instead.

usage: python moto_serial.py HOST PORT
"""
import sys

from moto.moto_server.threaded_moto_server import MotoRequestHandler
from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app
from werkzeug.serving import run_simple

if __name__ == "__main__":
    host, port = sys.argv[1], int(sys.argv[2])
    if not (host.startswith("127.") or host == "localhost"):
        sys.exit(f"refusing to listen on a non-loopback address: {host}")
    app = DomainDispatcherApplication(create_backend_app)
    run_simple(host, port, app, threaded=False, use_reloader=False, request_handler=MotoRequestHandler)
