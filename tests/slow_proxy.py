"""A TCP proxy on loopback in front of a real server (moto), for store-arbitration tests: it
holds each HTTP PUT back for `put_delay_s` before forwarding it, and can strip conditional
headers (`If-None-Match`, `If-Match`) as an S3-compatible store that ignores them would."""

from __future__ import annotations

import re
import socket
import threading
import time

_CONDITIONAL = re.compile(rb"\r\n(If-None-Match|If-Match): [^\r\n]*", re.IGNORECASE)


class SlowProxy:
    def __init__(self, target: str, put_delay_s: float = 0.3, strip_conditions: bool = False):
        host, port = target.removeprefix("http://").split(":")
        self.target = (host, int(port))
        self.put_delay_s, self.strip = put_delay_s, strip_conditions
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.puts = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(self.target)
            threading.Thread(target=self._pipe, args=(client, server, True), daemon=True).start()
            threading.Thread(target=self._pipe, args=(server, client, False), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, upstream: bool) -> None:
        try:
            while data := src.recv(65536):
                if upstream and data.startswith(b"PUT "):
                    self.puts += 1
                    time.sleep(self.put_delay_s)
                if upstream and self.strip:
                    data = _CONDITIONAL.sub(b"", data)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self.listener.close()
