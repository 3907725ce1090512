"""An S3-compatible server on loopback (moto's ``ThreadedMotoServer``) that counts the requests it
serves: what the benches and the tests put object storage's costs against (requests are what
object storage bills and what start-up latency is made of)."""
from __future__ import annotations

import collections
import logging
import os
import threading


class RequestCounter:
    """WSGI middleware: every request the server answers, counted by method."""

    def __init__(self, app):
        self.app = app
        self.counts: collections.Counter = collections.Counter()
        self._lock = threading.Lock()

    def __call__(self, environ, start_response):
        with self._lock:
            self.counts[environ.get("REQUEST_METHOD", "?")] += 1
        return self.app(environ, start_response)


class LoopbackS3:
    """Started on 127.0.0.1 on a free port; ``endpoint`` is its URL, ``requests()`` how many it
    has served since the last ``reset()``. Needs moto[server] (the test and bench extras)."""

    def __init__(self):
        from moto.server import ThreadedMotoServer
        logging.getLogger("werkzeug").setLevel(logging.ERROR)
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self._server.start()
        wsgi = self._server._server  # werkzeug's server: it reads .app on every request
        self._counter = RequestCounter(wsgi.app)
        wsgi.app = self._counter
        host, port = self._server.get_host_and_port()
        self.endpoint = f"http://{host}:{port}"

    def requests(self, method: str | None = None) -> int:
        c = self._counter.counts
        return c[method] if method else sum(c.values())

    def by_method(self) -> dict[str, int]:
        return dict(self._counter.counts)

    def reset(self) -> None:
        with self._counter._lock:
            self._counter.counts.clear()

    def stop(self) -> None:
        self._server.stop()


def use_for_s3(endpoint: str) -> None:
    """Point fsspec's s3 filesystems (this process and its children) at ``endpoint``, with
    throwaway credentials where none are set."""
    import fsspec.config
    for k, v in (("AWS_ACCESS_KEY_ID", "kdcache-bench"), ("AWS_SECRET_ACCESS_KEY", "kdcache-bench"),
                 ("AWS_DEFAULT_REGION", "us-east-1")):
        os.environ.setdefault(k, v)
    fsspec.config.conf.setdefault("s3", {})["endpoint_url"] = endpoint
    os.environ["FSSPEC_S3_ENDPOINT_URL"] = endpoint
