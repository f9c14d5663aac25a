"""A loopback HTTP file server for the download tests (127.0.0.1, an unused port, a daemon thread).

    with Server({"/a/file.pt": data}) as s:   # s.url = "http://127.0.0.1:PORT"
        ... s.url + "/a/file.pt" ...
        s.gets("/a/file.pt")  # -> the Range header (or None) of every GET of that path

It honours `Range: bytes=N-` (206 + Content-Range) so that resumed downloads can be checked; `cut`
{path: n} makes the next n answers for that path announce the full Content-Length, send half and close
the connection (a download cut midway); `delay_s` holds every answer back so that clients overlap.
"""

from __future__ import annotations

import http.server
import threading
import time


class Server:
    def __init__(self, files: dict[str, bytes] | None = None):
        self.files = dict(files or {})
        self.cut: dict[str, int] = {}
        self.requests: list[tuple[str, str | None]] = []  # (path, Range header) of every GET
        self.delay_s = 0.0
        self._httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    def gets(self, path: str) -> list[str | None]:
        return [rng for p, rng in self.requests if p == path]

    def __enter__(self) -> "Server":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()


def _handler(server: Server) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's name
            rng = self.headers.get("Range")
            server.requests.append((self.path, rng))
            time.sleep(server.delay_s)
            if self.path not in server.files:
                self.send_error(404)
                return
            data = server.files[self.path]
            start = int(rng[len("bytes="):].rstrip("-")) if rng else 0
            body = data[start:]
            self.send_response(206 if rng else 200)
            if rng:
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if server.cut.get(self.path, 0) > 0:
                server.cut[self.path] -= 1
                self.wfile.write(body[: len(body) // 2])
                self.close_connection = True
                return
            self.wfile.write(body)

        def log_message(self, *args):  # quiet test output
            pass

    return Handler
