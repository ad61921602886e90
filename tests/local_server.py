"""A tiny HTTP server on 127.0.0.1 for the tests that download images: shared by test_images.py and
test_images_hostile.py."""

import contextlib
import http.server
import threading

import pytest


class QuietServer(http.server.ThreadingHTTPServer):
    """A threading HTTP server that prints nothing when a client hangs up early (a refused or timed-out
    download is what those tests do): a traceback on stderr would land in a later test's output."""

    def handle_error(self, request, client_address):
        pass


@contextlib.contextmanager
def serve(handler):
    """Serve ``handler`` (a BaseHTTPRequestHandler class) on a free port; yields the base URL."""
    httpd = QuietServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.fixture(autouse=True)
def no_proxy(monkeypatch):
    """Make sure requests talks to 127.0.0.1 directly, whatever proxy the machine has configured (autouse in
    every module that imports it)."""
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
