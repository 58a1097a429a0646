"""Progress bars that read well in a terminal and in a log file.

On a terminal: an ordinary tqdm bar. Elsewhere (CI, nohup, SLURM logs) tqdm would write every
refresh as another carriage-return line; here the bar is written as one timestamped line at most
every `TTM_PROGRESS_INTERVAL` seconds (default 30) and once when it closes.
"""

from __future__ import annotations

import os
import re
import sys
import time
from typing import Any, TextIO

from tqdm import tqdm

DEFAULT_INTERVAL_S = 30.0
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


class _TimestampedLines:
    """A file for tqdm that turns each refresh into one `[HH:MM:SS] bar` line."""

    def __init__(self, stream: TextIO):
        self.stream = stream

    def write(self, s: str) -> int:
        text = _ANSI.sub("", s).replace("\r", "").strip()  # nested bars move the cursor: not in a file
        if text:
            self.stream.write(f"[{time.strftime('%H:%M:%S')}] {text}\n")
        return len(s)

    def flush(self) -> None:
        self.stream.flush()


class _LogBar(tqdm):
    """A tqdm whose explicit refreshes (set_postfix, bar.n = ...; refresh()) also wait out
    `mininterval`, so a log gets one line per interval whatever the caller does."""

    _last_line = 0.0

    def refresh(self, nolock=False, lock_args=None):
        now = time.time()
        if now - self._last_line < getattr(self, "mininterval", 0.0):  # (unset on a disabled bar)
            return None
        self._last_line = now
        return super().refresh(nolock=nolock, lock_args=lock_args)


def is_tty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def bar(iterable: Any = None, *, file: TextIO | None = None, **kw: Any) -> tqdm:
    """`tqdm(iterable, **kw)` on a terminal; sparse timestamped lines otherwise."""
    stream = file if file is not None else sys.stderr
    if is_tty(stream):
        return tqdm(iterable, file=stream, **kw)
    interval = float(os.environ.get("TTM_PROGRESS_INTERVAL", DEFAULT_INTERVAL_S))
    kw["leave"] = True  # in a log the closing line is the one a reader wants
    return _LogBar(iterable, file=_TimestampedLines(stream), mininterval=interval, maxinterval=max(interval, 10.0),
                bar_format="{l_bar}{r_bar}", **kw)
