"""Progress output: a tqdm bar on a terminal, sparse timestamped lines in a log file."""

from __future__ import annotations

import io
import re

from ttm.progress import bar


def test_log_file_gets_sparse_timestamped_lines(monkeypatch):
    monkeypatch.setenv("TTM_PROGRESS_INTERVAL", "3600")
    buf = io.StringIO()
    for _ in bar(range(500), file=buf, desc="work"):
        pass
    lines = buf.getvalue().splitlines()
    assert "\r" not in buf.getvalue()
    assert 1 <= len(lines) <= 3  # first, (maybe one more), final: not one line per update
    assert all(re.match(r"\[\d\d:\d\d:\d\d\] work: ", x) for x in lines)
    assert "500/500" in lines[-1]


def test_terminal_gets_a_tqdm_bar():
    class Tty(io.StringIO):
        def isatty(self):
            return True

    buf = Tty()
    for _ in bar(range(3), file=buf, desc="tty", mininterval=0):
        pass
    assert "\r" in buf.getvalue() and "[" not in buf.getvalue().split("tty")[0]


def test_cursor_moves_of_nested_bars_stay_out_of_log_lines(monkeypatch):
    monkeypatch.setenv("TTM_PROGRESS_INTERVAL", "0")
    buf = io.StringIO()
    outer = bar(range(2), file=buf, desc="outer")
    for _ in outer:
        for _ in bar(range(3), file=buf, desc="inner"):
            pass
    assert "\x1b" not in buf.getvalue()
    assert all(re.match(r"\[\d\d:\d\d:\d\d\] (outer|inner): ", x) for x in buf.getvalue().splitlines())


def test_explicit_refreshes_wait_out_the_interval(monkeypatch):
    monkeypatch.setenv("TTM_PROGRESS_INTERVAL", "3600")
    buf = io.StringIO()
    b = bar(total=100, file=buf, desc="train")
    for i in range(100):
        b.update(1)
        b.set_postfix(loss=f"{i:.3f}")  # refreshes on every call in plain tqdm
    b.close()
    assert len(buf.getvalue().splitlines()) <= 2  # the first line and the closing one


def test_a_disabled_bar_in_a_log_is_silent():
    buf = io.StringIO()
    b = bar(range(5), file=buf, desc="off", disable=True)
    for _ in b:
        b.set_postfix(x=1)
    b.close()
    assert buf.getvalue() == ""
