"""The backbone contract suite on every registered backbone, on user backbones loaded by
path, and on deliberately broken ones; the backbones CLIs and the pytest plugin."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from backbones.base import build_backbone, count_params, registered
from backbones.cli import check_cli, list_cli
from backbones.contract import CHECKS, run_contract

USER_FILE = Path(__file__).parent / "example_user_backbone.py"


def user(cls_name: str) -> str:
    return f"{USER_FILE}:{cls_name}"


def _measured(detail: str) -> float:
    """The first measured discrepancy quoted in a check's detail."""
    return float(re.search(r"max abs diff ([0-9.e+-]+)", detail).group(1))


@pytest.mark.parametrize("name", list(registered()))
def test_registered_backbone_meets_contract(name):
    results = run_contract(name)
    assert [r.name for r in results] == list(CHECKS)
    failed = [f"{r.name}: {r.detail}" for r in results if r.passed is False]
    assert not failed, f"{name} fails the contract: {failed}"
    for r in results:
        if r.passed is None:
            assert r.detail.startswith("skipped"), r
    by = {r.name: r for r in results}
    segments = re.findall(r"\) ([0-9.]+e[+-]\d+)", by["decode_prefix"].detail)  # prefill, continued, step()
    assert len(segments) == 3 and max(map(float, segments)) < 1e-4
    if not torch.cuda.is_available():
        assert by["gpu_kernel"].passed is None and by["gpu_kernel"].detail == "skipped: no CUDA"


def test_user_backbone_by_file_path_passes(capsys):
    assert check_cli([user("SomeBackbone")]) == 0
    out = capsys.readouterr().out
    assert "0 failed" in out and "decode_cross" in out


def test_user_backbone_by_dotted_path(monkeypatch):
    monkeypatch.syspath_prepend(str(USER_FILE.parent))
    results = run_contract("example_user_backbone:SomeBackbone", checks=["build", "decode_prefix", "param_matching"])
    assert all(r.passed for r in results), results


def test_peeking_backbone_fails_causality_with_discrepancy(capsys):
    assert check_cli([user("PeekingBackbone"), "--checks", "causality,decode_prefix"]) == 1
    out = capsys.readouterr().out
    line = next(ln for ln in out.splitlines() if ln.startswith("causality"))
    assert "FAIL" in line and "not causal" in line
    assert _measured(line) > 1e-2  # the leaked next token moves past outputs by O(1)


def test_step_mismatch_fails_decoding_only():
    by = {r.name: r for r in run_contract(user("StepMismatchBackbone"), checks=["causality", "decode_prefix"])}
    assert by["causality"].passed is True
    assert by["decode_prefix"].passed is False
    detail = by["decode_prefix"].detail
    assert "teacher-forced decoding differs" in detail
    # prefill goes through forward() and matches; the step() segment carries the error
    step_diff = float(re.search(r"step\(\) \[\d+,\d+\) ([0-9.e+-]+)", detail).group(1))
    assert step_diff > 1e-3


def test_dead_parameter_fails_gradients():
    (r,) = run_contract(user("DeadParamBackbone"), checks=["gradients"])
    assert r.passed is False and "unused" in r.detail and "no gradient" in r.detail


def test_unknown_backbone_lists_registered_names():
    with pytest.raises(ValueError, match=r"registered backbones: .*mamba2.*transformer"):
        run_contract("no_such_backbone")
    with pytest.raises(ValueError, match="registered backbones"):
        check_cli(["no_such_backbone"])
    with pytest.raises(FileNotFoundError, match="missing.py"):
        run_contract("missing.py:Nope")
    with pytest.raises(ValueError, match="unknown contract check"):
        run_contract("transformer", checks=["nope"])


def test_contract_leaves_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    run_contract("transformer", checks=["build", "determinism"])
    assert torch.equal(torch.rand(3), expected)


def test_list_cli_json(capsys):
    assert list_cli(["--json", "--d-model", "32", "--n-layers", "2", "--seq-len", "64"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert set(rows) == set(registered())
    torch.manual_seed(0)
    assert rows["mamba2"]["params_prefix"] == count_params(build_backbone("mamba2", d_model=32, n_layers=2))
    assert rows["transformer"]["params_cross"] == count_params(
        build_backbone("transformer", d_model=32, n_layers=2, cross_attention=True)
    )
    assert rows["mamba2"]["constant_state"] is True and rows["transformer"]["constant_state"] is False
    # the KV cache holds K and V for every position: 2 layers x 2 x 64 x 32
    assert rows["transformer"]["state_size"] == 2 * 2 * 64 * 32
    for r in rows.values():
        assert r["conditioning"] == ["prefix", "cross"]
        assert r["train_flops_per_token"] > r["decode_flops_per_token"] > 0


def test_list_cli_table(capsys):
    assert list_cli(["--d-model", "32"]) == 0
    out = capsys.readouterr().out
    assert "train FLOPs/tok" in out
    for name in registered():
        assert re.search(rf"^{name}\s", out, re.MULTILINE)
    with pytest.raises(ValueError, match="positive"):
        list_cli(["--d-model", "0"])


def test_pytest_plugin_fixture(ttm_contract):
    results = ttm_contract(user("SomeBackbone"), checks=["build", "causality"])
    assert [r.passed for r in results] == [True, True]
    with pytest.raises(pytest.fail.Exception, match=r"fails 1 contract check\(s\):\n  causality: not causal"):
        ttm_contract(user("PeekingBackbone"), checks=["build", "causality"])


def test_pytest_plugin_import_is_light():
    code = "import sys, backbones.pytest_plugin; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_a_backbone_file_that_does_not_parse_is_one_clear_error(tmp_path, capsys):
    from ttm.cli import main

    bad = tmp_path / "mine.py"
    bad.write_text("import torch\ndef broken(:\n")
    assert main(["check-backbone", f"{bad}:Mine"]) == 2
    err = capsys.readouterr().err
    assert f"{bad}: line 2: invalid syntax" in err and "Traceback" not in err
    assert main(["check-backbone", str(bad)]) == 2
    assert "expected FILE.py:Class" in capsys.readouterr().err


def test_size_to_builds_each_size_once_per_process(monkeypatch):
    """Sizing to a parameter budget builds each distinct size once (its count is kept), so a second
    sizing in the same process (a run builds its model for training, then for generation) builds
    nothing and gives the same answer, which is the count of the model it names."""
    from backbones import base

    monkeypatch.setattr(base, "_PARAM_COUNTS", {})
    cls = base.get_backbone_cls("s4d")
    built: list[str] = []
    init = cls.__init__

    def counting_init(self, *args, **kw):
        built.append(json.dumps(kw, sort_keys=True))
        init(self, *args, **kw)

    monkeypatch.setattr(cls, "__init__", counting_init)
    first = base.size_to("s4d", 60_000, d_model=32)
    assert built and len(built) == len(set(built))  # no size built twice
    n = len(built)
    assert base.size_to("s4d", 60_000, d_model=32) == first and len(built) == n
    monkeypatch.undo()
    assert first.params == count_params(build_backbone("s4d", **first.kwargs))
