"""The backbone contract suite: plain functions returning results, used by the tests,
`ttm-bench check-backbone` and the pytest plugin (`ttm_contract` fixture).

    results = run_contract("mamba2")                       # a registered name
    results = run_contract("mypkg.mod:MyBackbone")          # a dotted path
    results = run_contract("path/to/file.py:MyBackbone", d_state=8)

Everything runs on a tiny instance (d_model 32, 2 layers, fp32, dropout 0) with fixed
seeds; the caller's global RNG state is left untouched. Each check yields a
`CheckResult(name, passed, detail)`: passed is True, False, or None (skipped, with
the reason in detail); detail states the measured discrepancy.

Checks: build, causality, decode_prefix, decode_cross, gradients, param_matching,
determinism, dtype, bf16, cross_uses_text, constant_state, config_roundtrip, gpu_kernel.

GPU check convention: mixers that have a fast kernel path expose a boolean attribute
`use_kernel`; the check compares kernel on vs off on CUDA (outputs, input gradients,
teacher-forced decoding). Backbones without one are compared CUDA against CPU.
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from backbones.base import Backbone, count_params, get_backbone_cls, size_to

CHECKS = (
    "build",
    "causality",
    "decode_prefix",
    "decode_cross",
    "gradients",
    "param_matching",
    "determinism",
    "dtype",
    "bf16",
    "cross_uses_text",
    "constant_state",
    "config_roundtrip",
    "gpu_kernel",
)

CAUSAL_TOL = 1e-5  # outputs before a perturbed position may move by float noise only (FFT convs)
MASK_TOL = 1e-6  # changing masked-out memory entries may not change the output
USES_TEXT_MIN = 1e-4  # a different text memory must change the output by at least this
GPU_TOL = 5e-3  # kernel vs reference on CUDA (kernels may use TF32 inside)


@dataclass
class CheckResult:
    name: str
    passed: bool | None  # None = skipped (reason in detail)
    detail: str

    @property
    def status(self) -> str:
        return "SKIP" if self.passed is None else ("PASS" if self.passed else "FAIL")

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "passed": self.passed, "status": self.status, "detail": self.detail}


def resolve_backbone(name_or_path: str) -> tuple[type[Backbone], str]:
    """A registered name, a dotted path `pkg.mod:Class`, or a file path `dir/file.py:Class`.

    Returns the class and a name that `backbones.base.get_backbone_cls` resolves (a
    file is imported once as module `ttm_user_<stem>`).
    """
    mod, sep, attr = name_or_path.rpartition(":")
    if sep and mod.endswith(".py"):
        path = Path(mod).resolve()
        if not path.is_file():
            raise FileNotFoundError(f"{mod}: backbone file not found (expected FILE.py:Class)")
        mod_name = f"ttm_user_{path.stem}"
        module = sys.modules.get(mod_name)
        if module is None or Path(getattr(module, "__file__", "")).resolve() != path:
            spec = importlib.util.spec_from_file_location(mod_name, path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[mod_name] = module
            try:
                spec.loader.exec_module(module)
            except BaseException:
                del sys.modules[mod_name]
                raise
        cls = getattr(module, attr, None)
        if not (isinstance(cls, type) and issubclass(cls, Backbone)):
            raise ValueError(f"{mod}: no backbones.base.Backbone subclass named {attr!r}")
        return cls, f"{mod_name}:{attr}"
    return get_backbone_cls(name_or_path), name_or_path


# ----------------------------------------------------------------------------- context


class _Ctx:
    def __init__(self, cls, name, kwargs, seq_len, batch_size, memory_len, tol, seed):
        self.cls, self.name, self.kwargs = cls, name, kwargs
        self.S, self.B, self.L, self.tol, self.seed = seq_len, batch_size, memory_len, tol, seed
        self.D = kwargs["d_model"]
        g = torch.Generator().manual_seed(seed + 1)
        self.x = torch.randn(self.B, self.S, self.D, generator=g)  # [B, S, D]
        self.memory = torch.randn(self.B, self.L, self.D, generator=g)  # [B, L, D]
        self.mask = torch.ones(self.B, self.L, dtype=torch.bool)  # [B, L], True = keep
        self.mask[-1, self.L // 2 :] = False  # the last item has masked text positions
        self.g = g

    def build(self, cross: bool = False, seed: int | None = None, **over: Any) -> Backbone:
        torch.manual_seed(self.seed if seed is None else seed)
        return self.cls(**{**self.kwargs, "cross_attention": cross, **over}).eval()

    def cond(self, cross: bool, device=None, dtype=None) -> tuple[Tensor | None, Tensor | None]:
        if not cross:
            return None, None
        return self.memory.to(device=device, dtype=dtype), self.mask.to(device)

    def randn(self, *shape: int) -> Tensor:
        return torch.randn(*shape, generator=self.g)


def _fmt(v: float) -> str:
    return f"{v:.2e}"


def _maxdiff(a: Tensor, b: Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


# ----------------------------------------------------------------------------- checks


def check_build(c: _Ctx) -> CheckResult:
    parts = []
    for cross in (False, True):
        m = c.build(cross)
        mem, mask = c.cond(cross)
        with torch.no_grad():
            y = m(c.x, mem, mask)
        if tuple(y.shape) != (c.B, c.S, c.D):
            return CheckResult("build", False, f"output shape {tuple(y.shape)}, expected {(c.B, c.S, c.D)}")
        if not torch.isfinite(y).all():
            return CheckResult("build", False, f"non-finite output ({'cross' if cross else 'prefix'} mode)")
        parts.append(f"{'cross' if cross else 'prefix'}: {count_params(m)} params")
    return CheckResult("build", True, "; ".join(parts) + f"; output [B, S, D] = {[c.B, c.S, c.D]}")


def check_causality(c: _Ctx) -> CheckResult:
    worst, where = 0.0, ""
    for cross in (False, True):
        m = c.build(cross)
        mem, mask = c.cond(cross)
        with torch.no_grad():
            y = m(c.x, mem, mask)
            for t in sorted({1, c.S // 2, c.S - 1}):
                x2 = c.x.clone()
                x2[:, t:] = c.randn(c.B, c.S - t, c.D)
                d = _maxdiff(m(x2, mem, mask)[:, :t], y[:, :t])
                if d > worst:
                    worst, where = d, f"{'cross' if cross else 'prefix'} mode, inputs changed from t={t}"
    if worst > CAUSAL_TOL:
        return CheckResult(
            "causality", False,
            f"not causal: outputs before the changed inputs moved by max abs diff {_fmt(worst)} "
            f"(tol {_fmt(CAUSAL_TOL)}; {where})",
        )
    return CheckResult("causality", True, f"past outputs unchanged by future inputs: max abs diff {_fmt(worst)}")


def check_decode(c: _Ctx, cross: bool) -> CheckResult:
    """Prefill x[:, :p1], continue the prefill with x[:, p1:p2], then step() the rest."""
    name = "decode_cross" if cross else "decode_prefix"
    m = c.build(cross)
    mem, mask = c.cond(cross)
    p1, p2 = max(1, c.S // 3), max(2, (2 * c.S) // 3)
    with torch.no_grad():
        y = m(c.x, mem, mask)
        state = m.allocate_state(c.B, c.S)
        ya = m(c.x[:, :p1], mem, mask, state=state)
        yb = m(c.x[:, p1:p2], mem, mask, state=state)
        ys = []
        for t in range(p2, c.S):
            yt = m.step(c.x[:, t], state, mem, mask)
            if tuple(yt.shape) != (c.B, c.D):
                return CheckResult(name, False, f"step() returned shape {tuple(yt.shape)}, expected {(c.B, c.D)}")
            ys.append(yt)
        ys = torch.stack(ys, 1)
    da, db, ds = _maxdiff(ya, y[:, :p1]), _maxdiff(yb, y[:, p1:p2]), _maxdiff(ys, y[:, p2:])
    detail = (
        f"max abs diff vs parallel forward: prefill [0,{p1}) {_fmt(da)}, continued prefill [{p1},{p2}) "
        f"{_fmt(db)}, step() [{p2},{c.S}) {_fmt(ds)} (tol {_fmt(c.tol)})"
    )
    ok = max(da, db, ds) < c.tol
    return CheckResult(name, ok, detail if ok else "teacher-forced decoding differs from forward: " + detail)


def check_gradients(c: _Ctx) -> CheckResult:
    bad, smallest, n = [], math.inf, 0
    for cross in (False, True):
        m = c.build(cross).train()
        mem, mask = c.cond(cross)
        y = m(c.x, mem, mask)
        (y * c.randn(*y.shape)).sum().backward()
        for pname, p in m.named_parameters():
            if not p.requires_grad:
                continue
            n += 1
            mode = "cross" if cross else "prefix"
            if p.grad is None:
                bad.append(f"{pname} ({mode}): no gradient")
            elif not torch.isfinite(p.grad).all():
                bad.append(f"{pname} ({mode}): non-finite gradient")
            else:
                g = p.grad.abs().max().item()
                if g == 0:
                    bad.append(f"{pname} ({mode}): gradient is all zero")
                smallest = min(smallest, g)
    if bad:
        more = f" (+{len(bad) - 6} more)" if len(bad) > 6 else ""
        return CheckResult("gradients", False, "; ".join(bad[:6]) + more)
    return CheckResult("gradients", True, f"{n} parameter tensors, smallest max|grad| {_fmt(smallest)}")


def check_param_matching(c: _Ctx) -> CheckResult:
    kw = {k: v for k, v in c.kwargs.items() if k != "n_layers"}
    kw["cross_attention"] = False

    def real(n_layers: int, **over: Any) -> int:
        torch.manual_seed(c.seed)
        return count_params(c.cls(**{**kw, "n_layers": n_layers, **over}))

    target = real(5)
    res = size_to(c.name, target, vary="n_layers", strict=False, **kw)
    parts = [(f"target {target} (5 layers) -> {res.params} at n_layers={res.kwargs['n_layers']} "
             f"({100 * res.rel_error:.2f}%)")]
    ok = res.rel_error <= 0.01
    ratio = kw.get("mlp_ratio", "default")
    ratio = c.cls.default_mlp_ratio if ratio == "default" else ratio
    # mlp_ratio is size_to's fine-tuning knob: test it when it changes the count
    if ratio is not None and real(5, mlp_ratio=1.5 * ratio) != target:
        target2 = (real(5) + real(6)) // 2  # between two layer counts: mlp_ratio must close the gap
        res2 = size_to(c.name, target2, vary="n_layers", strict=False, **kw)
        check = real(res2.kwargs["n_layers"], **{k: v for k, v in res2.kwargs.items() if k != "n_layers"})
        parts.append(
            f"target {target2} (between 5 and 6 layers) -> {res2.params} at n_layers={res2.kwargs['n_layers']}, "
            f"mlp_ratio={res2.kwargs.get('mlp_ratio')} ({100 * res2.rel_error:.2f}%)"
        )
        if check != res2.params:
            parts.append(f"meta-device count {res2.params} != real count {check}")
            ok = False
        ok = ok and res2.rel_error <= 0.01
    return CheckResult("param_matching", ok, "; ".join(parts) + " (tol 1%)")


def check_determinism(c: _Ctx) -> CheckResult:
    mem, mask = c.cond(True)
    m1, m2 = c.build(True), c.build(True)
    same_params = all(torch.equal(a, b) for a, b in zip(m1.state_dict().values(), m2.state_dict().values()))
    with torch.no_grad():
        y1, y1b, y2 = m1(c.x, mem, mask), m1(c.x, mem, mask), m2(c.x, mem, mask)
    if not same_params:
        return CheckResult("determinism", False, "same seed gave different initial parameters")
    if not torch.equal(y1, y1b):
        return CheckResult("determinism", False, f"same input twice: max abs diff {_fmt(_maxdiff(y1, y1b))}")
    if not torch.equal(y1, y2):
        return CheckResult("determinism", False, f"two builds with the same seed: max abs diff {_fmt(_maxdiff(y1, y2))}")
    return CheckResult("determinism", True, "same seed -> identical parameters and bit-identical outputs")


def check_dtype(c: _Ctx) -> CheckResult:
    m = c.build(True)
    mem, mask = c.cond(True)
    with torch.no_grad():
        y = m(c.x, mem, mask)
        st = m.allocate_state(c.B, c.S)
        ys = m.step(c.x[:, 0], st, mem, mask)
    for what, t in (("forward", y), ("step", ys)):
        if t.dtype != c.x.dtype or t.device != c.x.device:
            return CheckResult("dtype", False, f"{what} returned {t.dtype} on {t.device} for {c.x.dtype} on {c.x.device}")
    return CheckResult("dtype", True, f"forward and step follow the input: {y.dtype} on {y.device}")


def check_bf16(c: _Ctx) -> CheckResult:
    m = c.build(True)
    mem, mask = c.cond(True)
    with torch.no_grad():
        y32 = m(c.x, mem, mask)
        m = m.to(torch.bfloat16)
        xb, memb = c.x.bfloat16(), mem.bfloat16()
        try:
            y = m(xb, memb, mask)
            st = m.allocate_state(c.B, c.S)
            ys = m.step(xb[:, 0], st, memb, mask)
        except (RuntimeError, NotImplementedError) as e:
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            if "BFloat16" in msg or "bfloat16" in msg or "not implemented" in msg.lower():
                return CheckResult("bf16", None, f"skipped: bf16 not supported on CPU here ({msg})")
            raise
    for what, t in (("forward", y), ("step", ys)):
        if t.dtype != torch.bfloat16:
            return CheckResult("bf16", False, f"{what} returned {t.dtype} for bfloat16 input")
        if not torch.isfinite(t).all():
            return CheckResult("bf16", False, f"{what} gave non-finite values in bfloat16")
    d = _maxdiff(y, y32)
    mean = (y.double() - y32.double()).abs().mean().item()
    ok = d < 0.25 and mean < 0.05
    return CheckResult("bf16", ok, f"bf16 vs fp32 output: max abs diff {_fmt(d)}, mean {_fmt(mean)} (tol 0.25 / 0.05)")


def check_cross_uses_text(c: _Ctx) -> CheckResult:
    m = c.build(True)
    mem, mask = c.cond(True)
    mem2 = c.randn(*mem.shape)
    mem3 = mem.clone()
    mem3[~mask] = c.randn(int((~mask).sum()), c.D)  # change masked-out positions only
    with torch.no_grad():
        y, y2, y3 = m(c.x, mem, mask), m(c.x, mem2, mask), m(c.x, mem3, mask)
    d_text, d_masked = _maxdiff(y, y2), _maxdiff(y, y3)
    detail = (f"other text -> max abs change {_fmt(d_text)} (must exceed {_fmt(USES_TEXT_MIN)}); "
              f"changing masked-out text -> {_fmt(d_masked)} (must stay below {_fmt(MASK_TOL)})")
    return CheckResult("cross_uses_text", d_text > USES_TEXT_MIN and d_masked < MASK_TOL, detail)


def check_constant_state(c: _Ctx) -> CheckResult:
    m = c.build(False)
    n_short, n_long = m.state_size(1, 16), m.state_size(1, 4096)
    if not m.constant_state:
        return CheckResult("constant_state", None,
                           f"skipped: constant_state=False (state: {n_short} elements at 16 tokens, {n_long} at 4096)")
    with torch.no_grad():
        st = m.allocate_state(c.B, c.S)
        before = sum(b.mixer.state_numel(s["mixer"]) for b, s in zip(m.blocks, st))
        m(c.x[:, :-1], state=st)
        m.step(c.x[:, -1], st)
        after = sum(b.mixer.state_numel(s["mixer"]) for b, s in zip(m.blocks, st))
    ok = n_short == n_long and before == after
    return CheckResult(
        "constant_state", ok,
        f"state elements (batch 1): {n_short} at 16 tokens, {n_long} at 4096; batch {c.B}: "
        f"{before} allocated, {after} after decoding {c.S} tokens",
    )


def check_config_roundtrip(c: _Ctx) -> CheckResult:
    m = c.build(True)
    cfg = m.config()
    try:
        json.dumps(cfg)
    except TypeError as e:
        return CheckResult("config_roundtrip", False, f"config() is not JSON-serialisable: {e}")
    m2 = c.cls(**cfg).eval()
    m2.load_state_dict(m.state_dict(), strict=True)
    mem, mask = c.cond(True)
    with torch.no_grad():
        d = _maxdiff(m(c.x, mem, mask), m2(c.x, mem, mask))
    return CheckResult("config_roundtrip", d == 0.0, f"rebuilt from config() + state_dict: max abs diff {_fmt(d)}")


def check_gpu_kernel(c: _Ctx) -> CheckResult:
    if not torch.cuda.is_available():
        return CheckResult("gpu_kernel", None, "skipped: no CUDA")
    dev = torch.device("cuda")
    m = c.build(True).to(dev)
    mem, mask = c.cond(True, device=dev)
    x = c.x.to(dev)
    switches = [mod for mod in m.modules() if isinstance(getattr(mod, "use_kernel", None), bool)]

    proj = torch.randn(x.shape, generator=torch.Generator().manual_seed(0)).to(dev)

    def run(model) -> tuple[Tensor, Tensor, Tensor]:
        xi = x.clone().requires_grad_(True)
        y = model(xi, mem, mask)
        (y * proj).sum().backward()  # a random projection: y.square().sum() is flat after the final norm
        with torch.no_grad():
            st = model.allocate_state(c.B, c.S)
            p = c.S // 2
            dec = [model(x[:, :p], mem, mask, state=st)]
            dec += [model.step(x[:, t], st, mem, mask)[:, None] for t in range(p, c.S)]
        return y.detach(), xi.grad, torch.cat(dec, 1)

    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        if switches:
            old = [s.use_kernel for s in switches]
            for s in switches:
                s.use_kernel = True
            yk, gk, dk = run(m)
            for s in switches:
                s.use_kernel = False
            yr, gr, dr = run(m)
            for s, o in zip(switches, old):
                s.use_kernel = o
            what = f"kernel vs reference path ({len(switches)} mixers with use_kernel)"
        else:
            yk, gk, dk = run(m)
            yr, gr, dr = (t.to(dev) for t in run(c.build(True)))
            what = "CUDA vs CPU (no use_kernel switch)"
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    dy, dg, dd = _maxdiff(yk, yr), _maxdiff(gk, gr), max(_maxdiff(dk, yk), _maxdiff(dr, yr))
    ok = max(dy, dd) < GPU_TOL and dg < GPU_TOL * max(1.0, gr.abs().max().item())
    return CheckResult("gpu_kernel", ok,
                       f"{what}: output max abs diff {_fmt(dy)}, input-gradient {_fmt(dg)}, "
                       f"teacher-forced decode vs forward on CUDA {_fmt(dd)} (tol {_fmt(GPU_TOL)})")


_CHECK_FNS: dict[str, Callable[[_Ctx], CheckResult]] = {
    "build": check_build,
    "causality": check_causality,
    "decode_prefix": lambda c: check_decode(c, cross=False),
    "decode_cross": lambda c: check_decode(c, cross=True),
    "gradients": check_gradients,
    "param_matching": check_param_matching,
    "determinism": check_determinism,
    "dtype": check_dtype,
    "bf16": check_bf16,
    "cross_uses_text": check_cross_uses_text,
    "constant_state": check_constant_state,
    "config_roundtrip": check_config_roundtrip,
    "gpu_kernel": check_gpu_kernel,
}


def run_contract(
    name_or_path: str,
    *,
    seq_len: int = 12,
    batch_size: int = 2,
    memory_len: int = 5,
    tol: float = 1e-4,
    seed: int = 0,
    checks: list[str] | tuple[str, ...] | None = None,
    **backbone_kwargs: Any,
) -> list[CheckResult]:
    """Run the contract checks on a tiny instance of a backbone.

    `backbone_kwargs` go to the constructor (defaults d_model=32, n_layers=2, n_heads=4,
    dropout=0.0; the backbone's own knobs pass through). `checks` selects a subset of
    CHECKS. An unknown backbone raises ValueError listing the registered names.
    """
    cls, name = resolve_backbone(name_or_path)
    checks = list(CHECKS if checks is None else checks)
    unknown = [k for k in checks if k not in _CHECK_FNS]
    if unknown:
        raise ValueError(f"unknown contract check(s) {unknown}; expected some of {', '.join(CHECKS)}")
    if seq_len < 4 or batch_size < 1 or memory_len < 2:
        raise ValueError("contract: seq_len must be >= 4, batch_size >= 1 and memory_len >= 2")
    kwargs = {"d_model": 32, "n_layers": 2, "n_heads": 4, "dropout": 0.0, **backbone_kwargs}
    with torch.random.fork_rng(devices=[]):
        ctx = _Ctx(cls, name, kwargs, seq_len, batch_size, memory_len, tol, seed)
        results: list[CheckResult] = []
        built = True
        for key in checks:
            if not built:
                results.append(CheckResult(key, False, "not run: the backbone does not build"))
                continue
            try:
                results.append(_CHECK_FNS[key](ctx))
            except Exception as e:  # a crash is a failed check, reported with its message
                results.append(CheckResult(key, False, f"raised {type(e).__name__}: {e}"))
            if key == "build" and results[-1].passed is False:
                built = False
    return results


def format_results(results: list[CheckResult]) -> str:
    """A plain-text table: check, status, detail."""
    w = max([len("check")] + [len(r.name) for r in results])
    lines = [f"{'check':<{w}}  status  detail", f"{'-' * w}  ------  ------"]
    lines += [f"{r.name:<{w}}  {r.status:<6}  {r.detail}" for r in results]
    n_fail = sum(r.passed is False for r in results)
    n_skip = sum(r.passed is None for r in results)
    lines.append(f"{len(results) - n_fail - n_skip} passed, {n_fail} failed, {n_skip} skipped")
    return "\n".join(lines)
