"""Progress of a study: a live status line on a terminal, plain log lines otherwise.

Live (stderr is a TTY): one line redrawn in place —
``[#####.....] 12/40 done, 1 failed, 27 left, ETA 3m05s | running: digits/mlp/mag s=0.9 #1, ...``
and each failure printed above it. Plain (a log file, CI): one line per finished run.
The ETA divides the remaining runs by the rate observed in this session.
"""

from __future__ import annotations

import shutil
import sys
import time
from typing import TextIO


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class Progress:
    def __init__(
        self, total: int, *, done: int = 0, failed: int = 0, stream: TextIO | None = None, live: bool | None = None
    ):
        self.stream = stream or sys.stderr
        self.live = self.stream.isatty() if live is None else live
        self.total, self.done, self.failed = total, done, failed
        self._finished_now = 0
        self._to_run = total - done - failed
        self._started = time.monotonic()
        self.running: dict[str, str] = {}

    @property
    def finished_now(self) -> int:
        """Runs finished in this session."""
        return self._finished_now

    @property
    def remaining(self) -> int:
        return self.total - self.done - self.failed

    def eta(self) -> str:
        if not self._finished_now:
            return "?"
        rate = (time.monotonic() - self._started) / self._finished_now
        return _duration(rate * self.remaining)

    def start(self, run_id: str, label: str) -> None:
        self.running[run_id] = label
        if self.live:
            self._draw()

    def finish(self, run_id: str, label: str, outcome: dict) -> None:
        self.running.pop(run_id, None)
        self._finished_now += 1
        ok = outcome["status"] == "done"
        if ok:
            self.done += 1
        else:
            self.failed += 1
        seconds = outcome.get("seconds")
        took = f" {seconds:.1f}s" if seconds is not None else ""
        result = ""
        metrics = outcome.get("metrics") or {}
        if ok and metrics.get("perplexity") is not None:  # a language model
            result = f" perplexity {metrics['perplexity']:.2f}"
        elif ok and metrics.get("accuracy") is not None:
            result = f" accuracy {metrics['accuracy']:.4f}"
        elif not ok:
            result = " FAILED: " + (outcome.get("error") or "").splitlines()[0][:200]
        line = (
            f"[{self.done + self.failed}/{self.total}] {label}{took}{result} "
            f"({self.done} done, {self.failed} failed, {self.remaining} left, ETA {self.eta()})"
        )
        if self.live:
            if not ok:
                self._clear()
                print(line, file=self.stream, flush=True)
            self._draw()
        else:
            print(line, file=self.stream, flush=True)

    def message(self, text: str) -> None:
        if self.live:
            self._clear()
        print(text, file=self.stream, flush=True)
        if self.live:
            self._draw()

    def close(self) -> None:
        if self.live:
            self._clear()
        elapsed = _duration(time.monotonic() - self._started)
        print(
            f"{self.done}/{self.total} done, {self.failed} failed, {self.remaining} not run; "
            f"{self._finished_now} finished in this session in {elapsed}",
            file=self.stream,
            flush=True,
        )

    def _clear(self) -> None:
        self.stream.write("\r\033[K")

    def _draw(self) -> None:
        width = shutil.get_terminal_size((100, 20)).columns
        finished = self.done + self.failed
        filled = int(20 * finished / self.total) if self.total else 20
        bar = "#" * filled + "." * (20 - filled)
        running = ", ".join(self.running.values())
        text = (
            f"[{bar}] {finished}/{self.total} done, {self.failed} failed, {self.remaining} left, "
            f"ETA {self.eta()}" + (f" | running: {running}" if running else "")
        )
        self.stream.write("\r\033[K" + text[: max(10, width - 1)])
        self.stream.flush()
