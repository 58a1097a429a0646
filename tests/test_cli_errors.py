"""The error contract of every verb: one line naming the field/file, exit 2; tracebacks only with --debug."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from ttm.cli import main


def _run(capsys, *argv):
    code = main(list(argv))
    return code, capsys.readouterr().err


@pytest.mark.parametrize(
    "override, field",
    [
        ("train.steps=-5", "train.steps"),
        ("train.ckpt_every=0", "train.ckpt_every"),
        ("train.batch_size=0", "train.batch_size"),
        ("model.n_heads=3", "divisible by n_heads"),
        ("generate.seconds=0", "generate.seconds"),
        ("model.target_params=0", "model.target_params"),
    ],
)
def test_bad_config_values_are_one_line_naming_the_field(tmp_path, capsys, override, field):
    code, err = _run(capsys, "train", "--set", override, "--out", str(tmp_path / "run"))
    assert code == 2
    assert field in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_unreachable_target_params_names_the_closest_count(tmp_path, capsys):
    from ttm.config import load_config
    from ttm.factory import backbone_kwargs

    cfg = load_config(None, ["model.target_params=10"])
    with pytest.raises(ValueError, match=r"model.target_params: .*closest achievable is [\d,]+ params"):
        backbone_kwargs(cfg, 4, 256, 384)


def test_unexpected_errors_are_one_line_and_debug_reraises(monkeypatch, capsys):
    import ttm.cli as cli

    def boom(argv):
        raise RuntimeError("kaboom\nsecond line")

    monkeypatch.setitem(cli.VERBS, "boom", (f"{__name__}:_never", ""))
    monkeypatch.setattr(sys.modules[__name__], "_never", boom, raising=False)
    code, err = _run(capsys, "boom")
    assert code == 1 and "internal error: RuntimeError: kaboom second line" in err and "--debug" in err
    with pytest.raises(RuntimeError):
        main(["boom", "--debug"])


def test_io_errors_are_expected_failures(monkeypatch, capsys):
    import ttm.cli as cli

    def denied(argv):
        raise PermissionError(13, "Permission denied", "/read-only/out")

    monkeypatch.setitem(cli.VERBS, "deny", (f"{__name__}:_denied", ""))
    monkeypatch.setattr(sys.modules[__name__], "_denied", denied, raising=False)
    code, err = _run(capsys, "deny")
    assert code == 2 and "/read-only/out" in err and "Traceback" not in err


def test_sigterm_exits_143_and_sigint_130(tmp_path):
    """A verb that waits forever, killed by each signal: the exit code says which."""
    script = (  # SIGINT as in a foreground process (a suite started in the background ignores it)
        "import signal, sys, time, ttm.cli as c\n"
        "signal.signal(signal.SIGINT, signal.default_int_handler)\n"
        "c.VERBS['wait'] = ('time:sleep', '')\n"
        "import time as t\n"
        "orig = t.sleep\n"
        "t.sleep = lambda argv: (print('ready', flush=True), orig(60))\n"  # inside main: handlers set
        "sys.exit(c.main(['wait']))\n"
    )
    for sig, code in ((signal.SIGTERM, 143), (signal.SIGINT, 130)):
        p = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, env={**os.environ})
        assert p.stdout.readline().strip() == "ready"
        time.sleep(0.2)
        p.send_signal(sig)
        _, err = p.communicate(timeout=30)
        assert p.returncode == code, err
        assert "Traceback" not in err
