"""A small Flask app for kiln: a greeting, a per-process counter, a health check.

The counter lives in each gunicorn worker's memory. kiln snapshots the running VM, so
every MicroVM launched from the image starts with the counter where the snapshot left
it, and then counts on its own.
"""

import itertools
import os
import socket
import time

from flask import Flask, jsonify

GREETING = "Hello from a kiln MicroVM"
HOOKS = "/aws/lambda-microvms/runtime/v1"

app = Flask(__name__)
_hits = itertools.count(1)  # next() on a count is atomic under the GIL
_started = time.time()


@app.get("/")
def index():
    return (
        f"{GREETING}!\n"
        f"host {socket.gethostname()}, worker pid {os.getpid()}, "
        f"request {next(_hits)} to this worker, "
        f"up {time.time() - _started:.0f} s\n"
    ), 200, {"Content-Type": "text/plain; charset=utf-8"}


@app.get("/healthz")
def healthz():
    return jsonify(status="ok", pid=os.getpid())


# The AWS lifecycle hooks. kiln calls `ready` during the build when the image enables it;
# answering 200 means "snapshot me now". The others are accepted and ignored.
@app.post(f"{HOOKS}/<hook>")
def lifecycle_hook(hook):
    if hook not in ("ready", "validate", "run", "suspend", "resume"):
        return jsonify(error=f"unknown hook {hook}"), 404
    return jsonify(hook=hook, status="ok")


if __name__ == "__main__":
    # For a quick try without gunicorn: python3 app.py
    app.run(host="0.0.0.0", port=int(os.environ.get("PORT", "8080")))
