"""Progress of long loops: a tqdm bar on a terminal; elsewhere (a log file, a pipe, a batch job) one log line at
most every PROGRESS_LOG_SECONDS, so that logs stay readable."""
from __future__ import annotations

import logging
import sys
import time
from typing import Iterable, Iterator, Optional

from tqdm import tqdm

log = logging.getLogger(__name__)

PROGRESS_LOG_SECONDS = 60.0


def on_terminal() -> bool:
    """Whether stderr (where tqdm draws) is a terminal."""
    return sys.stderr.isatty()


class Progress:
    """`for x in Progress(items, desc=...)`, or `update(n)` by hand; `enabled=False` shows nothing."""

    def __init__(self, iterable: Optional[Iterable] = None, *, desc: str, total: Optional[int] = None,
                 initial: int = 0, enabled: bool = True):
        self.iterable, self.desc, self.enabled = iterable, desc, enabled
        self.total = total if total is not None else (len(iterable) if hasattr(iterable, "__len__") else None)
        self.count, self.initial = initial, initial
        self.bar = tqdm(total=self.total, desc=desc, initial=initial) if enabled and on_terminal() else None
        self.start = self.last_log = time.monotonic()

    def __iter__(self) -> Iterator:
        for item in self.iterable:
            yield item
            self.update()
        self.close()

    def update(self, n: int = 1) -> None:
        self.count += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.enabled and time.monotonic() - self.last_log >= PROGRESS_LOG_SECONDS:
            self.last_log = time.monotonic()
            log.info("%s", self.line())

    def line(self) -> str:
        """'desc: count/total (p%), r it/s, about s s left'."""
        rate = (self.count - self.initial) / max(time.monotonic() - self.start, 1e-9)
        if not self.total:
            return f"{self.desc}: {self.count}, {rate:.3g} it/s"
        left = (self.total - self.count) / rate if rate > 0 else float("inf")
        return (f"{self.desc}: {self.count}/{self.total} ({100 * self.count / self.total:.0f}%), {rate:.3g} it/s, "
                f"about {left:.0f} s left")

    def set_postfix_str(self, text: str) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
