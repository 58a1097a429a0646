"""ttm.util: atomic writes keep ordinary permissions; hashing and dotted dicts; the code version."""

from __future__ import annotations

import os
import re
import stat
import subprocess
import threading
import time

import numpy as np
import torch

from ttm.audio import atomic_torch_save, save_audio
from ttm.util import atomic_write_json, atomic_write_text, code_version, file_lock


def _mode(p) -> int:
    return stat.S_IMODE(os.stat(p).st_mode)


def test_atomic_writes_respect_the_umask(tmp_path):
    mask = os.umask(0)
    os.umask(mask)
    want = 0o666 & ~mask  # what open() would give; mkstemp alone gives 0600
    atomic_write_text(tmp_path / "a.txt", "x")
    atomic_write_json(tmp_path / "a.json", {"a": 1})
    atomic_torch_save({"w": torch.zeros(2)}, tmp_path / "a.pt")
    save_audio(tmp_path / "a.wav", np.zeros(160, np.float32), 16000)
    for name in ("a.txt", "a.json", "a.pt", "a.wav"):
        assert _mode(tmp_path / name) == want, name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "a.pt", "a.txt", "a.wav"]  # no temp left


def test_a_failed_torch_save_is_an_os_error_and_keeps_the_old_file(tmp_path, monkeypatch):
    import pytest

    atomic_torch_save({"w": torch.ones(2)}, tmp_path / "c.pt")

    def full_disk(obj, f, *a, **k):
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 4160 vs 4054")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OSError, match=r"c.pt: could not be written .*disk full"):
        atomic_torch_save({"w": torch.zeros(2)}, tmp_path / "c.pt")
    monkeypatch.undo()
    assert torch.equal(torch.load(tmp_path / "c.pt", weights_only=True)["w"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]


def test_file_lock_makes_a_second_holder_wait(tmp_path):
    """Two holders of one lock file (separate opens, as two processes have) never overlap."""
    lock, events = tmp_path / "sub" / ".lock", []

    def hold(tag: str, seconds: float) -> None:
        with file_lock(lock):
            events.append(f"{tag} in")
            time.sleep(seconds)
            events.append(f"{tag} out")

    with file_lock(lock):
        t = threading.Thread(target=hold, args=("second", 0.0))
        t.start()
        time.sleep(0.3)  # the second holder is waiting now
        events.append("first out")
    t.join(5)
    assert events == ["first out", "second in", "second out"]


def test_code_version_names_the_commit_and_says_when_tracked_files_changed(tmp_path):
    """A clean checkout gives its commit; a changed tracked file adds "+dirty" (an untracked file
    does not); outside git, None. Shipped results and bench runs record this."""
    assert code_version(tmp_path) is None
    git = ["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)
    (tmp_path / "a.txt").write_text("1")
    subprocess.run([*git, "add", "a.txt"], check=True)
    subprocess.run([*git, "commit", "-qm", "a"], check=True)
    head = subprocess.run([*git, "rev-parse", "HEAD"], check=True, capture_output=True, text=True).stdout.strip()
    assert code_version(tmp_path) == head and re.fullmatch(r"[0-9a-f]{40}", head)
    (tmp_path / "new.txt").write_text("untracked")
    assert code_version(tmp_path) == head
    (tmp_path / "a.txt").write_text("2")
    assert code_version(tmp_path) == head + "+dirty"
    assert code_version() is None or re.fullmatch(r"[0-9a-f]{40}(\+dirty)?", code_version())  # this checkout
