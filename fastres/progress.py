"""Progress of long loops (training epochs, conversion) that reads well in a terminal and in a log.

On a terminal: a live tqdm bar that is erased when done. Anywhere else (a file, `tee`, CI,
nohup): a plain line at most every `every_s` seconds and no carriage returns, so a log shows
where a run is without thousands of bar redraws.
"""
from __future__ import annotations

import sys
import time


def duration(s: float) -> str:
    """12 s, 4 min 05 s, 1 h 02 min."""
    s = max(0.0, s)
    if s < 10:
        return f"{s:.1f} s"
    if s < 60:
        return f"{s:.0f} s"
    if s < 3600:
        return f"{int(s // 60)} min {int(s % 60):02d} s"
    return f"{int(s // 3600)} h {int(s % 3600 // 60):02d} min"


class Progress:
    """`for x in Progress(it, total, desc, status=f)`; status() -> text shown after the count."""

    def __init__(self, iterable=None, total: int = 0, desc: str = "", every_s: float = 10.0, status=None,
                 log=None, stream=None, enabled: bool = True, done_line: bool = False):
        self.iterable, self.total, self.desc, self.every_s = iterable, total, desc, every_s
        self.status = status or (lambda: "")
        self.stream = stream or sys.stderr
        self.log = log or (lambda line: print(line, file=sys.stdout, flush=True))
        self.n, self.t0, self.last = 0, time.perf_counter(), time.perf_counter()
        self.bar = None
        self.enabled, self.done_line = enabled, done_line  # done_line: a last line when finished (logs)
        if enabled and getattr(self.stream, "isatty", lambda: False)():
            from tqdm import tqdm
            self.bar = tqdm(total=total, desc=desc, leave=False, mininterval=0.5, file=self.stream)

    def __iter__(self):
        try:
            for x in self.iterable:
                yield x
                self.update()
        finally:
            self.close()

    def update(self, n: int = 1) -> None:
        self.n += n
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(n)
            if self.n % 25 == 0 or self.n == self.total:
                self.bar.set_postfix_str(self.status(), refresh=False)
            return
        now = time.perf_counter()
        if now - self.last >= self.every_s and self.n < self.total:
            self.last = now
            self.log(self.line())

    def line(self) -> str:
        pct = f" ({self.n / self.total:.0%})" if self.total else ""
        status = self.status()
        return f"{self.desc}: {self.n:,}/{self.total:,}{pct}" + (f", {status}" if status else "")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        elif self.enabled and self.done_line:
            self.done_line = False
            self.log(f"{self.line()} in {duration(time.perf_counter() - self.t0)}")
