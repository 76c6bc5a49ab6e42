"""What a running job has done, read from its committed output: progress lines, counters, totals.

The output is the truth (it is what resume trusts too): a committed output file (Parquet or JSON
Lines) appears under its name only when complete, so counting new files' rows gives exactly what
was written, once. A daemon thread in the driver polls every `observability.progress_interval_s`,
logs one line (no TTY needed: a RayJob's log shows it), and advances the row/token counters by
what it found.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import pyarrow.compute as pc

from .config import Config
from .metrics import GENERATED_TOKENS, IMAGE_TOKENS, PROMPT_TOKENS, ROWS, metric
from .storage import output_batches, output_files

logger = logging.getLogger(__name__)

COLUMNS = ["error", "error_kind", "prompt_tokens", "image_tokens", "completion_tokens"]


@dataclass
class Tally:
    rows: int = 0
    failed: int = 0
    by_kind: Counter = field(default_factory=Counter)
    prompt_tokens: int = 0
    image_tokens: int = 0
    generated_tokens: int = 0
    files: list[str] = field(default_factory=list)

    @property
    def ok(self) -> int:
        return self.rows - self.failed

    def __add__(self, other: "Tally") -> "Tally":
        return Tally(self.rows + other.rows, self.failed + other.failed, self.by_kind + other.by_kind,
                     self.prompt_tokens + other.prompt_tokens, self.image_tokens + other.image_tokens,
                     self.generated_tokens + other.generated_tokens, self.files + other.files)

    @classmethod
    def of(cls, table) -> "Tally":
        """The tally of a table of output rows (COLUMNS)."""
        errors = pc.is_valid(table.column("error"))
        kinds = table.filter(errors).column("error_kind").to_pylist() if "error_kind" in table.schema.names else []
        return cls(
            rows=table.num_rows,
            failed=int(pc.sum(errors.cast("int64")).as_py() or 0),
            by_kind=Counter(k or "unknown" for k in kinds),
            prompt_tokens=int(pc.sum(table.column("prompt_tokens")).as_py() or 0),
            image_tokens=int(pc.sum(table.column("image_tokens")).as_py() or 0),
            generated_tokens=int(pc.sum(table.column("completion_tokens")).as_py() or 0),
        )


def tally(cfg: Config, files: list[str]) -> Tally:
    """The tally of these committed output files, a batch at a time (a resumed run of a large
    output must not hold all its rows on the driver)."""
    counted = sum((Tally.of(t) for t in output_batches(cfg.output.path, cfg.storage, COLUMNS, files)), Tally())
    counted.files = list(files)
    return counted


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s" if m else f"{s}s"


class Progress:
    """This run's tally over the files it wrote, and one log line per poll.

    `before`: the output's tally when the run started (a resumed run counts it as done);
    `total`: the rows the input will produce (after dropped duplicates); `ignore`: files that
    are there but count for nothing (uncommitted blocks that Ray Data deletes at start)."""

    def __init__(self, cfg: Config, before: Tally, total: int, clock=time.monotonic, record_metrics: bool = True,
                 ignore: list[str] = ()):
        self.cfg, self.before, self.total, self.clock = cfg, before, total, clock
        self.run = Tally()
        self.seen = set(before.files) | set(ignore)
        self.record_metrics = record_metrics
        self._last = (clock(), 0, 0)  # (time, rows, generated tokens) at the last line
        self.started = self._last[0]

    def poll(self) -> str:
        """Count files committed since the last poll; the progress line."""
        new = [f for f in output_files(self.cfg.output.path, self.cfg.storage) if f not in self.seen]
        if new:
            part = tally(self.cfg, new)
            self.run += part
            self.seen.update(new)
            if self.record_metrics:
                self._record(part)
        return self.line()

    def _record(self, part: Tally) -> None:
        if part.ok:
            metric(ROWS).inc(part.ok, tags={"status": "ok", "kind": "none"})
        for kind, n in part.by_kind.items():
            metric(ROWS).inc(n, tags={"status": "error", "kind": kind})
        for name, n in ((PROMPT_TOKENS, part.prompt_tokens), (IMAGE_TOKENS, part.image_tokens), (GENERATED_TOKENS, part.generated_tokens)):
            if n:
                metric(name).inc(n)

    def eta_s(self, rows_per_s: float) -> float | None:
        remaining = self.total - self.before.rows - self.run.rows
        return remaining / rows_per_s if rows_per_s > 0 else (0.0 if remaining <= 0 else None)

    def line(self) -> str:
        now = self.clock()
        then, rows_then, tokens_then = self._last
        dt = max(now - then, 1e-9)
        rate, token_rate = (self.run.rows - rows_then) / dt, (self.run.generated_tokens - tokens_then) / dt
        self._last = (now, self.run.rows, self.run.generated_tokens)
        done = self.before.rows + self.run.rows
        pct = 100.0 * done / self.total if self.total else 100.0
        eta = self.eta_s(rate)
        return (
            f"progress: {done}/{self.total} rows ({pct:.1f}%), ok {self.before.ok + self.run.ok}, "
            f"failed {self.before.failed + self.run.failed}, {rate:.2f} rec/s, {token_rate:.1f} generated tokens/s, "
            f"ETA {_duration(eta) if eta is not None else 'unknown'}"
        )


class Reporter:
    """The polling thread: a line every interval while the job runs, and a last one at the end."""

    def __init__(self, progress: Progress, interval_s: float):
        self.progress, self.interval_s = progress, interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="progress", daemon=True)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                logger.info(self.progress.poll())
            except Exception:  # a listing that failed once; the next poll may succeed
                logger.warning("progress: could not read the output", exc_info=True)

    def __enter__(self) -> "Reporter":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        logger.info(self.progress.poll())
