"""One check of the suite on a CUDA machine (run it through `bash benchmarks/gpu_check.sh`).

Sections, each guarded (a failure or a time-out is recorded and the next one runs):
  env       torch / CUDA / Triton / nvcc versions, the GPU, mamba_ssm and causal_conv1d presence
  peak      measured bf16 and fp32 (TF32 off) matmul peaks (the MFU denominators)
  train     bf16-autocast training throughput and MFU at the study's full scale: Prefix SiMBA
            and Cross Transformer (d_model 1024, 24 layers, DAC-like 9 codebooks x 1024, delay
            pattern, 768-d text of 32 tokens, 30 s clips = 2588 frames), batch sized to fit
  decode    recurrent decoding (state / KV cache) of both, batch 1 with CFG: steps/s and tokens/s,
            and the speed-up over re-running the whole sequence per token (the study's sampler)
  kernels   per SSM backbone: torch.compile of the pure-PyTorch path vs eager, mamba_ssm
            kernels (use_kernel) vs the pure path when importable, our fast pure paths (fused
            SSD, our S5 scan) vs their references, and a decoding step under
            torch.compile(mode="reduce-overhead") (CUDA graphs) vs eager: differences and speed ratios

Results go to `$OUT/gpu_check.json` (or ./gpu_check.json), rewritten after every section.
Progress lines carry timestamps; a global time guard (--budget-s, default 450 s) skips or
interrupts what would not finish. Without CUDA it prints a message and exits 0.
`--cpu-dry-run` runs every section at toy sizes on the CPU (to test this script).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # runs from a plain checkout: the project need not be installed
    sys.path.insert(0, str(REPO))

import torch

from ttm.util import code_version  # standard library only

T_START = time.time()
SECTIONS = ("env", "peak", "train", "decode", "kernels")
# seconds each section may take at most (the global budget may cut them shorter)
SECTION_CAP = {"env": 30, "peak": 30, "train": 200, "decode": 70, "kernels": 300}
RESERVE_S = 10  # kept for writing the results


def err(e: BaseException) -> str:
    """One short line for a recorded failure (compiler errors can run to pages)."""
    msg = " ".join(str(e).split())
    return f"{type(e).__name__}: {msg[:400]}{' ...' if len(msg) > 400 else ''}"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')} +{time.time() - T_START:6.1f}s] {msg}", flush=True)


class SectionTimeout(Exception):
    pass


@contextlib.contextmanager
def alarm(seconds: float):
    """Raise SectionTimeout in the main thread after `seconds` (POSIX SIGALRM). Nests: an inner
    alarm never outlives an outer one, and the outer one is re-armed with its remaining time."""
    outer = signal.getitimer(signal.ITIMER_REAL)[0]  # 0.0 when none is armed
    limit = max(0.5, seconds if not outer else min(seconds, outer))

    def handler(signum, frame):
        raise SectionTimeout(f"time limit of {limit:.0f} s exceeded")

    old = signal.signal(signal.SIGALRM, handler)
    t0 = time.time()
    signal.setitimer(signal.ITIMER_REAL, limit)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
        if outer:  # the outer alarm keeps its own deadline
            signal.setitimer(signal.ITIMER_REAL, max(0.01, outer - (time.time() - t0)))


# ----------------------------------------------------------------------------- settings


class Ctx:
    def __init__(self, a: argparse.Namespace):
        self.dry = a.cpu_dry_run
        self.device = torch.device("cpu" if self.dry else "cuda")
        self.deadline = T_START + a.budget_s
        self.compile = not a.no_compile
        self.pattern = a.pattern
        self.only = [b.strip() for b in a.backbones.split(",") if b.strip()] if a.backbones else None
        self.section_deadline = self.deadline
        if self.dry:  # toy sizes: every code path, seconds on a CPU
            self.full = {
                "d_model": 64,
                "n_layers": 2,
                "n_heads": 4,
                "K": 3,
                "card": 32,
                "text_dim": 16,
                "text_len": 4,
                "frames": 40,
                "d_state": 16,
                "headdim": 16,
                "chunk_size": 16,
            }
            self.kern = {"d_model": 32, "n_layers": 1, "batch": 2, "seq": 64}
            self.decode_frames, self.recompute_frames, self.mm = 12, 6, 256
            self.batches = [4, 2]
        else:
            self.full = {
                "d_model": 1024,
                "n_layers": 24,
                "n_heads": 16,
                "K": 9,
                "card": 1024,
                "text_dim": 768,
                "text_len": 32,
                "frames": a.frames,
                "d_state": 512,
                "headdim": 64,
                "chunk_size": 256,
            }
            self.kern = {"d_model": 512, "n_layers": 2, "batch": 4, "seq": 1024}
            self.decode_frames, self.recompute_frames, self.mm = 256, 32, 8192
            self.batches = [int(b) for b in a.batches.split(",")]

    def left(self) -> float:
        return self.deadline - time.time()

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16)


def timed(ctx: Ctx, fn: Callable[[], Any], repeats: int, warmup: int = 1) -> float:
    """Best wall seconds of `repeats` calls after `warmup` calls (synchronised)."""
    for _ in range(warmup):
        fn()
    ctx.sync()
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ctx.sync()
        best = min(best, time.perf_counter() - t0)
    return best


def free(ctx: Ctx) -> None:
    import gc

    gc.collect()
    if ctx.device.type == "cuda":
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- backbones


def load_backbones() -> tuple[dict[str, type], dict[str, str]]:
    """Registered backbones; built-ins that fail to import are reported instead of stopping the check."""
    import importlib

    from backbones import base

    failed = {}
    for name in base._BUILTINS:
        try:
            importlib.import_module(f"backbones.{name}")
        except Exception as e:  # noqa: BLE001 - e.g. a dependency missing on this machine
            failed[name] = f"{type(e).__name__}: {e}"
    try:
        reg = base.registered()
    except Exception as e:  # noqa: BLE001 - recorded, the check goes on
        failed["(registry)"] = f"{type(e).__name__}: {e}"
        reg = dict(base._REGISTRY)
    return reg, failed


def build_lm(ctx: Ctx, which: str):
    """The study's two full-scale models, "prefix_simba" or "cross_transformer", built by the
    training factory (ttm.factory.build_model) from their model.* settings."""
    from benchmarks.common import build_lm as factory_lm

    f = ctx.full
    if which == "prefix_simba":
        model = {
            "backbone": "simba",
            "conditioning": "prefix",
            "backbone_kwargs": {"mlp_ratio": 2.0, "d_state": f["d_state"], "headdim": f["headdim"],
                                "chunk_size": f["chunk_size"], "expand": 2, "d_conv": 4},
        }
    elif which == "cross_transformer":
        # mlp_ratio 2 gives the study's ~305M at 24 layers (4 would give ~400M)
        model = {"backbone": "transformer", "conditioning": "cross", "backbone_kwargs": {"mlp_ratio": 2.0}}
    else:
        raise ValueError(f"unknown model {which!r}")
    model.update(d_model=f["d_model"], n_layers=f["n_layers"], n_heads=f["n_heads"], pattern=ctx.pattern)
    if ctx.pattern != "delay":
        model["first_k"] = 1
    return factory_lm(f["K"], f["card"], f["text_dim"], **model).to(ctx.device)


def fake_batch(ctx: Ctx, B: int, frames: int):
    f = ctx.full
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, f["card"], (B, f["K"], frames), generator=g).to(ctx.device)  # [B, K, T]
    lengths = torch.full((B,), frames, device=ctx.device)
    te = torch.randn(B, f["text_len"], f["text_dim"], generator=g).to(ctx.device)  # [B, L, Dt]
    tm = torch.ones(B, f["text_len"], dtype=torch.bool, device=ctx.device)
    return codes, lengths, te, tm


def is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()


# ----------------------------------------------------------------------------- sections


def sec_env(ctx: Ctx, res: dict) -> dict:
    out: dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.cuda.is_available() else None,
    }
    if ctx.device.type == "cuda":
        p = torch.cuda.get_device_properties(0)
        out.update(
            gpu=p.name,
            capability=f"{p.major}.{p.minor}",
            memory_gib=round(p.total_memory / 2**30, 1),
            sm_count=p.multi_processor_count,
            gpus=torch.cuda.device_count(),
        )
    for mod in ("triton", "mamba_ssm", "causal_conv1d", "numpy"):
        try:
            m = __import__(mod)
            out[mod] = getattr(m, "__version__", "present")
        except Exception as e:  # noqa: BLE001 - recorded, the check goes on
            out[mod] = f"not importable ({type(e).__name__})"
    try:
        nv = subprocess.run(["nvcc", "--version"], check=False, capture_output=True, text=True, timeout=20)
        out["nvcc"] = (nv.stdout.strip().splitlines() or ["?"])[-1]
    except (OSError, subprocess.TimeoutExpired) as e:
        out["nvcc"] = f"not found ({type(e).__name__})"
    reg, failed = load_backbones()
    out["backbones"] = sorted(reg)
    out["backbones_failed"] = failed
    out["git_commit"] = code_version()  # "+dirty": the device ran uncommitted changes
    return out


def matmul_peak(ctx: Ctx, dtype: torch.dtype, n: int, repeats: int = 10) -> float:
    a = torch.randn(n, n, device=ctx.device, dtype=dtype)
    b = torch.randn(n, n, device=ctx.device, dtype=dtype)
    return 2 * n**3 / timed(ctx, lambda: torch.mm(a, b), repeats, warmup=2)


def sec_peak(ctx: Ctx, res: dict) -> dict:
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        fp32 = matmul_peak(ctx, torch.float32, ctx.mm // 2)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    bf16 = matmul_peak(ctx, torch.bfloat16, ctx.mm)
    log(f"  peak bf16 {bf16 / 1e12:.1f} TFLOP/s, fp32 {fp32 / 1e12:.1f} TFLOP/s")
    return {"bf16_flops": bf16, "fp32_flops": fp32, "mm_size": ctx.mm}


def train_one(ctx: Ctx, which: str, peak: float | None) -> dict:
    from ttm.flops import count_train_step_flops

    try:
        from ttm.train import param_groups  # needs pydantic and yaml; fall back to plain AdamW

        def groups(m):
            return param_groups(m, 0.02)
    except ImportError:

        def groups(m):
            return m.parameters()

    lm = build_lm(ctx, which).train()
    out: dict[str, Any] = {
        "pattern": ctx.pattern,
        "params": sum(p.numel() for p in lm.parameters()),
        "backbone_params": lm.non_embedding_params(),
        "frames": ctx.full["frames"],
        "positions": (ctx.full["text_len"] + 1 if lm.conditioning == "prefix" else 0)
        + lm.pattern.seq_len(ctx.full["frames"]),
    }
    log(
        f"  {which}: {out['params'] / 1e6:.1f}M params ({out['backbone_params'] / 1e6:.1f}M backbone), "
        f"{out['positions']} positions"
    )
    opt = torch.optim.AdamW(groups(lm), lr=1e-4)
    tried = []
    for B in ctx.batches:
        batch = fake_batch(ctx, B, ctx.full["frames"])

        def step(batch=batch):
            opt.zero_grad(set_to_none=True)
            with ctx.autocast():
                loss, _ = lm.loss(*batch)
            loss.backward()
            opt.step()

        oom = False
        try:
            if ctx.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            step_s = timed(ctx, step, repeats=3 if not ctx.dry else 1, warmup=2 if not ctx.dry else 1)
        except Exception as e:
            if not is_oom(e):
                raise
            oom = True
        if oom:  # outside the except block, so the traceback's tensors are released first
            tried.append(B)
            log(f"  {which}: batch {B} out of memory")
            opt.zero_grad(set_to_none=True)
            del batch, step
            free(ctx)
            continue
        with ctx.autocast():
            flops = count_train_step_flops(lm, *batch)["total"]
        T, K = ctx.full["frames"], lm.pattern.n_out
        out.update(
            batch=B,
            oom_batches=tried,
            step_s=step_s,
            flops_per_step=flops,
            achieved_flops=flops / step_s,
            frames_per_s=B * T / step_s,
            codebook_tokens_per_s=B * T * K / step_s,
            positions_per_s=B * out["positions"] / step_s,
            max_memory_gib=torch.cuda.max_memory_allocated() / 2**30 if ctx.device.type == "cuda" else None,
            mfu=(flops / step_s / peak) if peak else None,
        )
        log(
            f"  {which}: batch {B}, {step_s * 1e3:.0f} ms/step, {flops / step_s / 1e12:.1f} TFLOP/s"
            + (f", MFU {out['mfu']:.1%}" if peak else "")
            + f", {out['frames_per_s']:.0f} frames/s"
        )
        break
    else:
        out["error"] = f"out of memory at every batch size tried {tried}"
    return out


def sec_train(ctx: Ctx, res: dict) -> dict:
    peak = (res.get("peak") or {}).get("bf16_flops")
    out = {
        "note": "bf16 autocast, fp32 master weights, AdamW (the harness's training step); "
        "MFU = counted FLOPs (ttm.flops) / step time / measured bf16 matmul peak"
    }
    for which in ("prefix_simba", "cross_transformer"):
        try:
            out[which] = train_one(ctx, which, peak)
        except SectionTimeout:
            raise
        except Exception as e:  # noqa: BLE001 - recorded, the check goes on
            out[which] = {"error": err(e), "traceback": traceback.format_exc(limit=4)[-3000:]}
            log(f"  {which}: ERROR {err(e)}")
        free(ctx)  # the model and optimizer of train_one are gone now
    if all("step_s" in out[w] for w in ("prefix_simba", "cross_transformer")):
        s, t = out["prefix_simba"], out["cross_transformer"]
        out["simba_over_transformer_frames_per_s"] = s["frames_per_s"] / t["frames_per_s"]
    return out


def decode_one(ctx: Ctx, which: str) -> dict:
    lm = build_lm(ctx, which).eval()
    _, _, te, tm = fake_batch(ctx, 1, 1)
    g = torch.Generator().manual_seed(0)

    def gen(n, recurrent=True):
        with ctx.autocast():
            return lm.generate(
                te, tm, n, cfg_scale=3.0, top_k=250, temperature=1.2, generator=g, recurrent=recurrent
            )

    n = ctx.decode_frames
    steps = lm.pattern.seq_len(n)
    gen(4)  # warm-up
    rec_s = timed(ctx, lambda: gen(n), repeats=1, warmup=0)
    r: dict[str, Any] = {
        "frames": n,
        "steps": steps,
        "seconds": rec_s,
        "steps_per_s": steps / rec_s,
        "codebook_tokens_per_s": steps * lm.pattern.n_out / rec_s,
    }
    m = ctx.recompute_frames  # the study's sampler, on a short clip
    ms = lm.pattern.seq_len(m)
    rec_short = timed(ctx, lambda: gen(m), repeats=1, warmup=0)
    full_short = timed(ctx, lambda: gen(m, recurrent=False), repeats=1, warmup=0)
    r.update(
        recompute_frames=m,
        recurrent_short_s=rec_short,
        recompute_short_s=full_short,
        recurrent_speedup_short=full_short / rec_short,
    )
    log(
        f"  {which}: {r['steps_per_s']:.0f} steps/s ({r['codebook_tokens_per_s']:.0f} tokens/s); "
        f"recurrent vs recompute over {ms} steps: {full_short / rec_short:.1f}x"
    )
    return r


def sec_decode(ctx: Ctx, res: dict) -> dict:
    out: dict[str, Any] = {
        "note": "batch 1 with CFG 3 (2 sequences), top-k 250, temperature 1.2, bf16 autocast"
    }
    for which in ("prefix_simba", "cross_transformer"):
        try:
            out[which] = decode_one(ctx, which)
        except SectionTimeout:
            raise
        except Exception as e:  # noqa: BLE001 - recorded, the check goes on
            out[which] = {"error": err(e), "traceback": traceback.format_exc(limit=4)[-3000:]}
            log(f"  {which}: ERROR {err(e)}")
        free(ctx)
    return out


def _kernel_available(name: str) -> bool | None:
    """Whether the fast kernel behind `use_kernel` is importable (None: unknown backbone)."""
    if name == "mamba":
        from backbones import mamba

        return mamba.kernel_available(*mamba.SCAN_KERNEL)
    if name in ("mamba2", "simba", "hybrid"):
        from backbones import mamba2

        return mamba2._chunk_scan_kernel() is not None
    return None


def _fwd_bwd(model, x, r):
    """Output and input gradient of the loss mean(y * r): `r` is a fixed random tensor like y (a
    loss such as mean(y^2) would be flat here, since backbones end with an RMSNorm)."""
    xi = x.clone().requires_grad_(True)
    y = model(xi)
    (y.float() * r).mean().backward()
    return y.detach().float(), xi.grad.detach().float()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def kernel_one(ctx: Ctx, name: str, out: dict) -> None:
    """Fills `out` as it goes, so a time-out keeps what was measured before it."""
    from backbones.base import build_backbone

    k = ctx.kern
    torch.manual_seed(0)
    m = build_backbone(name, d_model=k["d_model"], n_layers=k["n_layers"]).to(ctx.device)
    x = torch.randn(k["batch"], k["seq"], k["d_model"], device=ctx.device)  # [B, S, D]
    r = torch.randn(k["batch"], k["seq"], k["d_model"], device=ctx.device)
    switches = [mod for mod in m.modules() if isinstance(getattr(mod, "use_kernel", None), bool)]
    for s in switches:
        s.use_kernel = False
    out.update(size=dict(k), use_kernel_switches=len(switches))
    ref_y, ref_g = _fwd_bwd(m, x, r)
    m.zero_grad(set_to_none=True)
    eager_s = timed(ctx, lambda: _fwd_bwd(m, x, r), repeats=3, warmup=1)
    out["eager_fwd_bwd_s"] = eager_s
    avail = _kernel_available(name) if switches else False
    if switches and avail is not False:
        for s in switches:
            s.use_kernel = True
        ky, kg = _fwd_bwd(m, x, r)
        k_s = timed(ctx, lambda: _fwd_bwd(m, x, r), repeats=3, warmup=1)
        for s in switches:
            s.use_kernel = False  # the compiled comparison below is of the pure path
        ktol = 5e-3  # as the contract's gpu_kernel check: kernels may use TF32 inside
        out["kernel"] = {
            "available": avail,
            "fwd_bwd_s": k_s,
            "speedup": eager_s / k_s,
            "out_rel_diff": _rel(ky, ref_y),
            "grad_rel_diff": _rel(kg, ref_g),
            "tol": ktol,
            "equal_within_tol": _rel(ky, ref_y) < ktol and _rel(kg, ref_g) < ktol,
        }
        log(
            f"  {name}: kernel vs pure {eager_s / k_s:.2f}x, "
            f"rel diff out {_rel(ky, ref_y):.1e} grad {_rel(kg, ref_g):.1e}"
        )
    else:
        out["kernel"] = {
            "available": False,
            "note": "no use_kernel switch" if not switches else "mamba_ssm kernel not importable",
        }
    # our fast pure-PyTorch paths vs their references (fused SSD vs autograd SSD, our S5 scan vs
    # the s5-pytorch package): the CPU tests check these too; here on the GPU, with their speed
    fast = [(mod, attr, ref) for mod in m.modules()
            for attr, ref in (("fused_ssd", False), ("use_package", True)) if hasattr(mod, attr)]
    if fast:
        for mod, attr, ref in fast:
            setattr(mod, attr, ref)
        ry, rg = _fwd_bwd(m, x, r)
        r_s = timed(ctx, lambda: _fwd_bwd(m, x, r), repeats=3, warmup=1)
        for mod, attr, ref in fast:
            setattr(mod, attr, not ref)
        out["fast_path"] = {
            "switch": fast[0][1],
            "reference_fwd_bwd_s": r_s,
            "speedup": r_s / eager_s,
            "out_rel_diff": _rel(ref_y, ry),
            "grad_rel_diff": _rel(ref_g, rg),
            "equal_within_tol": _rel(ref_y, ry) < 1e-3 and _rel(ref_g, rg) < 1e-3,
        }
        log(f"  {name}: fast path vs reference {r_s / eager_s:.2f}x, rel diff out {_rel(ref_y, ry):.1e}")
    tol = 1e-3
    if ctx.compile and ctx.device.type == "cuda":
        out["graph_step"] = graph_step(ctx, m)
    if ctx.compile:
        t0 = time.perf_counter()
        cm = torch.compile(m)
        cy, cg = _fwd_bwd(cm, x, r)
        ctx.sync()
        compile_s = time.perf_counter() - t0
        comp_s = timed(ctx, lambda: _fwd_bwd(cm, x, r), repeats=3, warmup=1)
        out["compile"] = {
            "compile_s": compile_s,
            "fwd_bwd_s": comp_s,
            "speedup": eager_s / comp_s,
            "out_rel_diff": _rel(cy, ref_y),
            "grad_rel_diff": _rel(cg, ref_g),
            "tol": tol,
            "equal_within_tol": _rel(cy, ref_y) < tol and _rel(cg, ref_g) < tol,
        }
        log(
            f"  {name}: compiled vs eager {eager_s / comp_s:.2f}x, rel diff out {_rel(cy, ref_y):.1e} "
            f"grad {_rel(cg, ref_g):.1e} (compile {compile_s:.0f} s)"
        )
        del cm
        torch._dynamo.reset()
    else:
        out["compile"] = {"skipped": "--no-compile"}


def graph_step(ctx: Ctx, m) -> dict:
    """One decoding step (batch 2 = CFG) eager vs `Backbone.compiled_step` (what
    `generate --compile-step` runs: torch.compile with mode "reduce-overhead" on CUDA, which
    captures CUDA graphs where the step allows it, as mamba_ssm's generation does by hand)."""
    try:
        k = ctx.kern
        x = torch.randn(2, k["d_model"], device=ctx.device)
        st = m.allocate_state(2, 64, device=ctx.device)
        with torch.no_grad():
            ref = m.step(x, st)
            eager = timed(ctx, lambda: m.step(x, st), repeats=20, warmup=2)
            st2 = m.allocate_state(2, 64, device=ctx.device)
            cstep = m.compiled_step()
            t0 = time.perf_counter()
            y = cstep(x, st2)
            ctx.sync()
            compile_s = time.perf_counter() - t0
            graphed = timed(ctx, lambda: cstep(x, st2), repeats=20, warmup=2)
        return {
            "eager_step_s": eager,
            "graph_step_s": graphed,
            "speedup": eager / graphed,
            "compile_s": compile_s,
            "first_step_rel_diff": _rel(y.float(), ref.float()),
        }
    except Exception as e:  # noqa: BLE001 - recorded, the check goes on
        return {"error": err(e)}
    finally:
        torch._dynamo.reset()


def sec_kernels(ctx: Ctx, res: dict) -> dict:
    reg, _ = load_backbones()
    first = (
        "simba",
        "mamba2",
        "s4d",
        "s5",
        "hybrid",
        "mamba",
    )  # the study's first; mamba's compile is slowest
    names = [n for n in first if n in reg] + [n for n in reg if n not in first and n != "transformer"]
    if ctx.only is not None:
        names = [n for n in names if n in ctx.only]
    out: dict[str, Any] = {
        "note": "fp32 with TF32 off; relative diff = max |a - b| / max |reference|; "
        "speed-ups are over the eager pure-PyTorch path (forward+backward)"
    }
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        for i, name in enumerate(names):
            end = (
                min(ctx.deadline - RESERVE_S, ctx.section_deadline) - 2
            )  # 2 s slack for the section's own alarm
            share = (end - time.time()) / max(1, len(names) - i)
            if share < 5:
                out[name] = {"skipped": "time guard"}
                continue
            out[name] = {}
            try:
                with alarm(share):
                    kernel_one(ctx, name, out[name])
            except Exception as e:  # noqa: BLE001 - a timeout or failure of one backbone leaves the others
                out[name].update(error=err(e), traceback=traceback.format_exc(limit=4)[-3000:])
                log(f"  {name}: ERROR {err(e)}")
                torch._dynamo.reset()
            free(ctx)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    return out


FUNCS = {"env": sec_env, "peak": sec_peak, "train": sec_train, "decode": sec_decode, "kernels": sec_kernels}


# ----------------------------------------------------------------------------- main


def out_path() -> Path:
    return Path(os.environ.get("OUT") or ".") / "gpu_check.json"


def write(res: dict) -> None:
    p = out_path()
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(res, indent=1, default=str) + "\n")
    os.replace(tmp, p)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--budget-s", type=float, default=450.0, help="global time guard in seconds (default 450)"
    )
    ap.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated: " + ", ".join(SECTIONS))
    ap.add_argument(
        "--frames", type=int, default=2588, help="training clip frames (default 2588 = 30 s of DAC)"
    )
    ap.add_argument("--batches", default="8,4,2,1", help="batch sizes to try, largest first")
    ap.add_argument(
        "--pattern",
        choices=["delay", "first_k"],
        default="delay",
        help="delay: all 9 codebooks (single stage, ~298M / ~322M params); first_k: the first codebook "
        "only (the study's stage 1: 281.0M / 305.0M)",
    )
    ap.add_argument("--no-compile", action="store_true", help="skip torch.compile comparisons")
    ap.add_argument(
        "--backbones", default=None, help="kernels section: only these backbones (comma-separated)"
    )
    ap.add_argument("--cpu-dry-run", action="store_true", help="toy sizes on the CPU (tests this script)")
    a = ap.parse_args(argv)
    sections = [s.strip() for s in a.sections.split(",") if s.strip()]
    bad = [s for s in sections if s not in SECTIONS]
    if bad:
        print(f"gpu_check: unknown section(s) {bad}; expected some of {', '.join(SECTIONS)}", file=sys.stderr)
        return 2
    if not a.cpu_dry_run and not torch.cuda.is_available():
        print(f"gpu_check: CUDA is not available (torch {torch.__version__}); nothing to check.")
        return 0
    ctx = Ctx(a)
    res: dict[str, Any] = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "dry_run": ctx.dry,
        "budget_s": a.budget_s,
        "sections": sections,
    }
    log(f"gpu_check on {ctx.device}{' (dry run)' if ctx.dry else ''}; results -> {out_path()}")
    for name in sections:
        room = min(SECTION_CAP[name], ctx.left() - RESERVE_S)
        if room < 5:
            res[name] = {"skipped": f"time guard ({ctx.left():.0f} s left)"}
            log(f"{name}: skipped (time guard)")
            write(res)
            continue
        log(f"{name}: start (limit {room:.0f} s)")
        t0 = time.time()
        ctx.section_deadline = t0 + room
        try:
            with alarm(room):
                res[name] = FUNCS[name](ctx, res)
        except Exception as e:  # noqa: BLE001 - recorded, the check goes on
            res[name] = {"error": err(e), "traceback": traceback.format_exc(limit=6)[-3000:]}
            log(f"{name}: ERROR {err(e)}")
            free(ctx)
        res[name]["section_s"] = round(time.time() - t0, 1)
        log(f"{name}: done in {time.time() - t0:.1f} s")
        res["elapsed_s"] = round(time.time() - T_START, 1)
        write(res)
    log(f"all done in {time.time() - T_START:.0f} s; wrote {out_path()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
