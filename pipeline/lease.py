"""One writer per output: a lease object beside the output, taken before any work.

Two runs on one output (a RayJob retried while its first driver still runs, a user starting the
same job twice) would both write every row. The lease `<output.path>.lease` names its holder
(host, boot id, pid, run id) and carries a heartbeat the holder refreshes every
`output.lease_expiry_s / 3` seconds.

- The store arbitrates: the lease is created with an exclusive create (locally a hard link of a
  written file, which fails if the name exists; on S3 a PUT with `If-None-Match: *`) and every
  later write (heartbeat, takeover, release) is a compare-and-swap on what was read (locally under
  an flock of `<lease>.lock`; on S3 `If-Match` on the ETag). Two runs never both hold it, however
  slow the store. An S3-compatible store that ignores conditional writes is found at start and
  falls back to write-then-read-back, with a warning naming the risk.
- A rerun after a crash starts at once when the holder ran on this machine (same host and boot
  id) and its process is gone. A holder elsewhere that stopped beating is waited for, up to
  `output.lease_wait_s` (default: the expiry), then taken over; one that keeps beating through
  the wait is refused in one line.
- Fencing: a holder whose lease was taken over (paused past the expiry, then resumed) finds out
  at its next heartbeat, and before each output file is published (`Fence`): it stops before
  committing another block and the run ends in one line.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass

from .config import Config
from .errors import JobError, LeaseLost, one_line
from .storage import fsspec_fs, is_local

logger = logging.getLogger(__name__)

WAIT_LOG_S = 5.0  # how often a run waiting for a lease says so
POLL_S = 1.0


def lease_path(cfg: Config) -> str:
    return cfg.output.path.rstrip("/") + ".lease"


def _boot_id() -> str | None:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return None


def _process_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (/proc/<pid>/stat field 22): with the
    pid, it names one process, so a reused pid is not mistaken for the holder."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _process_gone(pid: int, start: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return start is not None and _process_start(pid) not in (None, start)


# -- the store: create exclusively, compare-and-swap, delete ----------------------------------------


class LocalStore:
    """A lease file on a local (or network) disk. `token` is the content read: a swap happens
    only while the file still holds it, checked and written under an flock of `<lease>.lock`."""

    conditional = True

    def __init__(self, path: str):
        self.path = path

    def _tmp(self, body: bytes) -> str:
        tmp = f"{self.path}.{uuid.uuid4().hex}.tmp"
        with open(tmp, "wb") as f:
            f.write(body)
        return tmp

    def read(self) -> tuple[bytes | None, bytes | None]:
        try:
            with open(self.path, "rb") as f:
                body = f.read()
            return body, body
        except FileNotFoundError:
            return None, None

    def create(self, body: bytes) -> bytes | None:
        tmp = self._tmp(body)
        try:
            os.link(tmp, self.path)  # fails if the name exists: an exclusive create of a whole file
            return body
        except FileExistsError:
            return None
        finally:
            os.unlink(tmp)

    def _locked(self):
        fd = os.open(f"{self.path}.lock", os.O_CREAT | os.O_RDWR, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX)
        return fd

    def swap(self, token: bytes, body: bytes | None) -> bytes | None:
        """Replace (or with body None, delete) the lease if it still holds `token`; the new token or None."""
        fd = self._locked()
        try:
            if self.read()[1] != token:
                return None
            if body is None:
                os.unlink(self.path)
                return b""
            os.replace(self._tmp(body), self.path)
            return body
        finally:
            os.close(fd)


def _precondition_failed(e: BaseException) -> bool:
    response = getattr(e.__cause__, "response", None) or getattr(e, "response", None) or {}
    code = str(response.get("Error", {}).get("Code", ""))
    return isinstance(e, FileExistsError) or code in ("PreconditionFailed", "ConditionalRequestConflict", "412", "409")


class S3Store:
    """A lease object on S3: create with `If-None-Match: *`, swap with `If-Match` on the ETag."""

    def __init__(self, fs, path: str):
        self.fs, self.path = fs, path
        self.bucket, self.key = path.split("/", 1)
        self.conditional = self._probe()

    def _put(self, body: bytes, key: str | None = None, **condition) -> str:
        return self.fs.call_s3("put_object", Bucket=self.bucket, Key=key or self.key, Body=body, **condition)["ETag"]

    def _probe(self) -> bool:
        """Does the store arbitrate conditional writes? A second create of one object must fail."""
        key = f"{self.key}.probe-{uuid.uuid4().hex}"
        try:
            self._put(b"probe", key)
            try:
                self._put(b"probe", key, IfNoneMatch="*")
            except Exception as e:  # noqa: BLE001 -- any refusal means: no arbitration here
                if _precondition_failed(e):
                    return True
                reason = one_line(e)
            else:
                reason = "it accepted a second exclusive create of one object"
        finally:
            self.fs.call_s3("delete_object", Bucket=self.bucket, Key=key)
        logger.warning(
            "output lease: this S3 store does not arbitrate conditional writes (%s); falling back to write "
            "then read back, where two runs started within one store round trip can both write the output", reason)
        return False

    def read(self) -> tuple[bytes | None, str | None]:
        """The body and its ETag, from one GET."""
        from fsspec.asyn import sync

        async def get():
            got = await self.fs._call_s3("get_object", Bucket=self.bucket, Key=self.key)
            async with got["Body"] as stream:
                return await stream.read(), got["ETag"]

        try:
            return sync(self.fs.loop, get)
        except FileNotFoundError:
            return None, None

    def create(self, body: bytes) -> str | None:
        if not self.conditional:
            if self.read()[0] is not None:
                return None
            self._put(body)
            time.sleep(0.2)  # the last write wins: a run that lost sees another holder here
            now, etag = self.read()
            return etag if now == body else None
        try:
            return self._put(body, IfNoneMatch="*")
        except Exception as e:
            if _precondition_failed(e):
                return None
            raise

    def swap(self, token: str, body: bytes | None) -> str | None:
        if not self.conditional:
            if self.read()[1] != token:
                return None
            if body is None:
                self.fs.call_s3("delete_object", Bucket=self.bucket, Key=self.key)
                return ""
            return self._put(body)
        try:
            if body is None:
                self.fs.call_s3("delete_object", Bucket=self.bucket, Key=self.key, IfMatch=token)
                return ""
            return self._put(body, IfMatch=token)
        except FileNotFoundError:
            return None
        except Exception as e:
            if _precondition_failed(e):
                return None
            raise


@dataclass(frozen=True)
class Fence:
    """Checked in the write tasks before an output file is published: the lease still names this
    run. Picklable: it travels to the write tasks with the output filesystem."""

    fs: object  # fsspec filesystem of the lease
    path: str
    run: str

    def __call__(self) -> None:
        try:
            with self.fs.open(self.path, "rb") as f:
                held = json.loads(f.read())
        except (FileNotFoundError, ValueError):
            held = {}
        if held.get("run") != self.run:
            raise LeaseLost(f"output.path: this run's lease {self.path} is now held by {held.get('owner', 'nobody')}; "
                            "it stopped before writing another block")


class Lease:
    """Held from `acquire` until `release`; refreshed by a daemon thread meanwhile."""

    def __init__(self, cfg: Config):
        self.url = lease_path(cfg)
        self.expiry_s = cfg.output.lease_expiry_s
        self.wait_s = cfg.output.lease_wait_s if cfg.output.lease_wait_s is not None else self.expiry_s
        self.fs, self.path = fsspec_fs(self.url, cfg.storage)
        self.store = LocalStore(self.path) if is_local(self.fs) else S3Store(self.fs, self.path)
        self.run = uuid.uuid4().hex[:8]
        self.host, self.pid, self.boot = socket.gethostname(), os.getpid(), _boot_id()
        self.owner = f"{self.host}:{self.pid}:{self.run}"
        self.token = None
        self.lost: str | None = None  # who took the lease over, once it happened
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _body(self) -> bytes:
        return json.dumps({
            "owner": self.owner, "host": self.host, "boot_id": self.boot, "pid": self.pid,
            "pid_start": _process_start(self.pid), "run": self.run, "heartbeat": time.time(), "expiry_s": self.expiry_s,
        }).encode()

    def _verdict(self, held: dict) -> str | None:
        """Why the lease `held` may be taken over now, or None while its holder counts as alive."""
        age = time.time() - float(held.get("heartbeat", 0))
        if not held:
            return "an unreadable lease"
        if age >= float(held.get("expiry_s", self.expiry_s)):
            return f"the expired lease of {held.get('owner')} (heartbeat {age:.0f} s ago)"
        same_machine = held.get("host") == self.host and held.get("boot_id") == self.boot and self.boot is not None
        if same_machine and isinstance(held.get("pid"), int) and _process_gone(held["pid"], held.get("pid_start")):
            return f"the lease of {held.get('owner')}: its process is gone (this machine, heartbeat {age:.0f} s ago)"
        return None

    def acquire(self) -> "Lease":
        deadline, said = time.monotonic() + self.wait_s, 0.0
        first_beat: float | None = None
        while True:
            self.token = self.store.create(self._body())
            if self.token is not None:
                break
            body, token = self.store.read()
            if body is None:
                continue  # released between our create and read: try again
            try:
                held = json.loads(body)
            except ValueError:
                held = {}
            why = self._verdict(held)
            if why is not None:
                self.token = self.store.swap(token, self._body())
                if self.token is not None:
                    logger.warning("output.path: took over %s", why)
                    break
                continue  # another run changed it first: judge again
            age = time.time() - float(held["heartbeat"])
            left = float(held.get("expiry_s", self.expiry_s)) - age
            first_beat = first_beat if first_beat is not None else float(held["heartbeat"])
            if time.monotonic() >= deadline:
                beating = float(held["heartbeat"]) > first_beat
                raise JobError(
                    f"output.path: another run is writing this output ({held.get('owner')}, heartbeat {age:.0f} s ago"
                    f"{', still beating after ' + format(self.wait_s, '.0f') + ' s of waiting' if beating else ''}); "
                    f"a second writer would duplicate rows. Wait for it to finish; if it crashed, its lease "
                    f"{self.url} expires {max(0.0, left):.0f} s from now (output.lease_wait_s waits for it)"
                )
            if time.monotonic() - said >= WAIT_LOG_S:
                said = time.monotonic()
                logger.warning("output.path: waiting for the lease of %s (heartbeat %.0f s ago, expires in %.0f s)",
                               held.get("owner"), age, max(0.0, left))
            time.sleep(min(POLL_S, max(0.0, deadline - time.monotonic()), max(0.05, left)))
        self._thread = threading.Thread(target=self._beat, name="lease-heartbeat", daemon=True)
        self._thread.start()
        return self

    def fence(self) -> Fence:
        return Fence(self.fs, self.path, self.run)

    def check(self) -> None:
        """Raise LeaseLost (one line) if another run holds the lease now."""
        self.fence()()

    def _beat(self) -> None:
        while not self._stop.wait(self.expiry_s / 3):
            try:
                token = self.store.swap(self.token, self._body())
            except Exception:  # the next beat may succeed; expiry allows a few misses
                logger.warning("could not refresh the output lease %s", self.url, exc_info=True)
                continue
            if token is None:
                body, _ = self.store.read()
                self.lost = (json.loads(body).get("owner") if body else None) or "nobody"
                logger.error("output.path: this run's lease %s was taken over by %s; no further block is written",
                             self.url, self.lost)
                return
            self.token = token

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self.lost is None and self.token is not None:
            self.store.swap(self.token, None)

    def __enter__(self) -> "Lease":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
