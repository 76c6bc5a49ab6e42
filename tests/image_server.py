"""A real HTTP server on a loopback address for the fetch and SSRF tests.

Routes are set per test: fixed bodies (with or without Content-Length), redirects, slow
drips and answers held until a test releases them; every request's path and Host header are recorded so a test can see what reached it.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Route:
    body: bytes = b""
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    content_length: bool = True  # False: no header, the body ends when the connection closes
    drip_s: float = 0.0  # pause before each 1 KiB piece
    drip_headers_s: float = 0.0  # pause before each byte of the status line and headers
    gate: threading.Event | None = None  # answer only once it is set (a fetch held as long as a test needs)


class ImageServer:
    def __init__(self, host: str = "127.0.0.1"):
        self.routes: dict[str, Route] = {}
        self.seen: list[tuple[str, str | None]] = []  # (path, Host header)
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                server.seen.append((self.path, self.headers.get("Host")))
                route = server.routes.get(self.path, Route(b"not found", 404))
                if route.gate is not None:
                    route.gate.wait()
                if route.drip_headers_s:  # a server that sends its head a byte at a time
                    head = f"HTTP/1.1 {route.status} OK\r\nContent-Length: {len(route.body)}\r\n\r\n".encode()
                    try:
                        for byte in head:
                            time.sleep(route.drip_headers_s)
                            self.wfile.write(bytes([byte]))
                            self.wfile.flush()
                        self.wfile.write(route.body)
                    except (BrokenPipeError, ConnectionResetError):
                        pass
                    return
                self.send_response(route.status)
                for k, v in route.headers.items():
                    self.send_header(k, v)
                if route.content_length:
                    self.send_header("Content-Length", str(len(route.body)))
                self.end_headers()
                for i in range(0, len(route.body), 1024):
                    time.sleep(route.drip_s)
                    try:
                        self.wfile.write(route.body[i : i + 1024])
                        self.wfile.flush()
                    except (BrokenPipeError, ConnectionResetError):
                        return  # the client gave up (byte cap, deadline): that is the point

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer((host, 0), Handler)
        self.httpd.daemon_threads = True
        self.host, self.port = self.httpd.server_address[:2]
        self._thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)

    def url(self, path: str, host: str | None = None) -> str:
        return f"http://{host or self.host}:{self.port}{path}"

    def add(self, path: str, body: bytes, **kw) -> str:
        self.routes[path] = Route(body, **kw)
        return self.url(path)

    def redirect(self, path: str, location: str, status: int = 302) -> str:
        return self.add(path, b"", status=status, headers={"Location": location})

    def __enter__(self) -> "ImageServer":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
