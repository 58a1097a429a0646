"""The kernel/reference knob: no silent fallback, the path that ran is recorded."""

from __future__ import annotations

import sys

import pytest
import torch

from backbones.base import build_backbone
from backbones.ops import dispatch, fused_cpu
from backbones.ops.dispatch import KernelUnavailable, kernel_paths


@pytest.fixture
def no_mamba_ssm(monkeypatch):
    """A machine without mamba_ssm: its import fails, and nothing is cached from before."""
    monkeypatch.setattr(dispatch, "_CACHE", {})
    for mod in [m for m in sys.modules if m == "mamba_ssm" or m.startswith("mamba_ssm.")]:
        monkeypatch.delitem(sys.modules, mod)
    monkeypatch.setitem(sys.modules, "mamba_ssm", None)  # `import mamba_ssm...` raises ImportError


@pytest.mark.parametrize("name, module", [("mamba2", "mamba_ssm.ops.triton.ssd_combined"),
                                          ("mamba", "mamba_ssm.ops.selective_scan_interface")])
def test_kernel_without_the_package_is_an_error_naming_the_module(no_mamba_ssm, name, module):
    m = build_backbone(name, d_model=16, n_layers=1, d_state=4, kernel="kernel")
    with pytest.raises(KernelUnavailable, match=module.replace(".", r"\.")):
        m(torch.randn(1, 5, 16))


@pytest.mark.parametrize("name", ["mamba", "mamba2", "simba", "hybrid"])
def test_auto_on_cpu_runs_and_records_the_reference(no_mamba_ssm, name):
    m = build_backbone(name, d_model=16, n_layers=2, d_state=4)
    assert all(p["ran"] is None for p in kernel_paths(m).values())
    m(torch.randn(1, 5, 16))
    paths = kernel_paths(m)
    assert paths, f"{name} has no mixer with a kernel switch"
    for p in paths.values():
        assert p["kernel"] == "auto" and p["ran"]
        assert all(path.startswith("reference: ") for path in p["ran"].values()), p


def test_reference_never_loads_a_kernel(monkeypatch):
    def boom(*a):
        raise AssertionError("the reference path asked for a kernel")

    monkeypatch.setattr(dispatch, "load_kernel", boom)
    m = build_backbone("mamba2", d_model=16, n_layers=1, d_state=4, kernel="reference")
    m(torch.randn(1, 5, 16))
    m.step(torch.randn(1, 16), m.allocate_state(1, 5))
    assert list(kernel_paths(m).values()) == [{"kernel": "reference", "ran": {
        "conv": "reference: backbones.mamba2.causal_conv_silu", "scan": "reference: backbones.mamba2.ssd_chunked",
        "norm": "reference: backbones.mamba2.GatedRMSNorm", "step": "reference: backbones.mamba2.Mamba2Mixer.step"}}]


def test_bad_knob_value_is_rejected():
    with pytest.raises(ValueError, match="kernel must be one of auto, kernel, reference"):
        build_backbone("mamba2", d_model=16, n_layers=1, kernel="triton")


def test_use_kernel_switch_maps_to_the_knob():
    mixer = build_backbone("mamba2", d_model=16, n_layers=1, d_state=4).blocks[0].mixer
    mixer.use_kernel = False
    assert mixer.kernel == "reference"
    mixer.use_kernel = True
    assert mixer.kernel == "kernel"


def test_run_summary_records_the_path_each_mixer_ran(tmp_path):
    from tests.synthetic import synthetic_prepared, tiny_config
    from ttm.train import run

    s = run(tiny_config(**{"train.steps": 2, "model.backbone": "mamba2"}), tmp_path, data=synthetic_prepared(),
            progress=False)
    paths = s["kernel_paths"]
    assert paths and all(p["kernel"] == "auto" for p in paths.values())
    assert {p["ran"]["scan"] for p in paths.values()} == {
        "reference: backbones.mamba2.ssd_chunked" + (" (numba: backbones.ops.fused_cpu)" if fused_cpu.AVAILABLE else "")}


def test_configs_of_earlier_runs_with_use_kernel_still_build():
    for old, new in ((True, "auto"), (False, "reference")):
        m = build_backbone("mamba2", d_model=16, n_layers=1, d_state=4, use_kernel=old)
        assert m.blocks[0].mixer.kernel == new
