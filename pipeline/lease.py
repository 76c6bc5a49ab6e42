"""One writer per output: a lease object beside the output, taken before any work.

Two runs on one output (a RayJob retried while its first driver still runs, a user starting the
same job twice) would both write every row. The lease `<output.path>.lease` names its holder
(host, pid, run id) and carries a heartbeat the holder refreshes every `output.lease_expiry_s / 3`
seconds; a second run refuses in one line naming the holder. A crashed driver stops refreshing,
so its lease expires after `output.lease_expiry_s` (default 90 s: a few missed heartbeats of
slack for a slow object store or a paused process, yet a retried RayJob waits at most a minute
and a half) and the next run takes it over. Works the same on local disk and on S3.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid

from .config import Config
from .errors import JobError
from .storage import fsspec_fs

logger = logging.getLogger(__name__)


def lease_path(cfg: Config) -> str:
    return cfg.output.path.rstrip("/") + ".lease"


class Lease:
    """Held from `acquire` until `release`; refreshed by a daemon thread meanwhile."""

    def __init__(self, cfg: Config):
        self.url = lease_path(cfg)
        self.fs, self.path = fsspec_fs(self.url, cfg.storage)
        self.expiry_s = cfg.output.lease_expiry_s
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _read(self) -> dict | None:
        try:
            with self.fs.open(self.path, "rb") as f:
                return json.loads(f.read())
        except FileNotFoundError:
            return None
        except (ValueError, OSError):  # half-written or unreadable: treat as expired
            return {}

    def _write(self) -> None:
        body = json.dumps({"owner": self.owner, "heartbeat": time.time(), "expiry_s": self.expiry_s}).encode()
        with self.fs.open(self.path, "wb") as f:
            f.write(body)

    def acquire(self) -> "Lease":
        held = self._read()
        if held:
            age = time.time() - float(held.get("heartbeat", 0))
            if age < float(held.get("expiry_s", self.expiry_s)):
                raise JobError(
                    f"output.path: another run is writing this output ({held.get('owner')}, heartbeat {age:.0f} s ago); "
                    f"a second writer would duplicate rows. Wait for it to finish; if it crashed, its lease "
                    f"{self.url} expires {max(0.0, float(held.get('expiry_s', self.expiry_s)) - age):.0f} s from now"
                )
            logger.warning("taking over the expired lease of %s (heartbeat %.0f s ago)", held.get("owner"), age)
        self._write()
        # Two runs that found no lease at once both wrote one: the last write wins, and the
        # loser sees a holder other than itself here.
        time.sleep(0.2)
        now = self._read()
        if not now or now.get("owner") != self.owner:
            raise JobError(f"output.path: another run took the lease {self.url} at the same moment ({(now or {}).get('owner')}); "
                           "a second writer would duplicate rows")
        self._thread = threading.Thread(target=self._beat, name="lease-heartbeat", daemon=True)
        self._thread.start()
        return self

    def _beat(self) -> None:
        while not self._stop.wait(self.expiry_s / 3):
            try:
                self._write()
            except Exception:  # the next beat may succeed; expiry allows a few misses
                logger.warning("could not refresh the output lease %s", self.url, exc_info=True)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        held = self._read()
        if held and held.get("owner") == self.owner:
            self.fs.rm(self.path)

    def __enter__(self) -> "Lease":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
