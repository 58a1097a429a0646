"""Training one model (`ttm-bench train` is ttm/runs.py, which dispatches on the model kind).

One loop for one CPU, one GPU or many processes (`torchrun --nproc_per_node=N -m ttm.runs
CONFIG`, or `ttm-bench train --nproc N`): budgets in steps, tokens, FLOPs or seconds;
gradient accumulation; AdamW with no-decay groups; warm-up + cosine; bf16 autocast on
CUDA; optional EMA; validation per codebook; NaN guard; exact resume from atomic
checkpoints (model, optimizer, scheduler, RNG, data position, counters).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path

import torch
from torch import nn

from backbones.base import count_params
from backbones.ops.dispatch import kernel_paths
from ttm.config import RESUME_IGNORED, RunConfig, config_from_dict
from ttm.factory import build_model
from ttm.flops import analytic_flops_per_token, count_train_step_flops
from ttm.lm import TTMLM
from ttm.loggers import open_loggers
from ttm.prepare import Prepared, Split, prepare
from ttm.progress import bar as progress_bar
from ttm.rundir import RunDir, read_log
from ttm.util import atomic_write_text, diff_keys, keep_freed_memory, pop_dotted, stop_on_signals

# ----------------------------------------------------------------------------- optimizer


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay by shape, as nanoGPT: matrices decay; vectors (norms, biases, SSM A/D/dt) do not,
    nor any parameter its module tags `_no_weight_decay` (token embeddings, SSM dynamics)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        skip = p.dim() < 2 or getattr(p, "_no_weight_decay", False)
        (no_decay if skip else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def adamw(model: nn.Module, weight_decay: float, **kw) -> torch.optim.AdamW:
    """AdamW over `param_groups` with the multi-tensor (foreach) update on every device. On CPU
    torch's default is a loop over the parameters with the same arithmetic: the same bits, 1.1-1.3x
    slower (the demo's Mamba2, 68 tensors: 9.8 against 7.7 ms per step)."""
    return torch.optim.AdamW(param_groups(model, weight_decay), foreach=True, **kw)


def lr_lambda(warmup: int, total: int, min_ratio: float):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        prog = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * prog))

    return f


# ----------------------------------------------------------------------------- data order


def epoch_perm(n: int, seed: int, epoch: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100003 + epoch))


def next_indices(pos: dict, n: int, batch: int, seed: int) -> list[int]:
    """Indices of the next global batch; `pos` = {"epoch", "idx"} is advanced in place."""
    out: list[int] = []
    while len(out) < batch:
        perm = epoch_perm(n, seed, pos["epoch"])
        take = perm[pos["idx"] : pos["idx"] + batch - len(out)].tolist()
        out += take
        pos["idx"] += len(take)
        if pos["idx"] >= n:
            pos["epoch"] += 1
            pos["idx"] = 0
    return out


def batch_of(split: Split, idx: list[int], device, max_frames: int | None = None, gen=None):
    codes, lengths = split.codes[idx], split.lengths[idx]
    if max_frames and codes.shape[-1] > max_frames:
        starts = [
            int(torch.randint(0, max(1, int(l) - max_frames + 1), (1,), generator=gen)) for l in lengths
        ]
        codes = torch.stack([c[:, s : s + max_frames] for c, s in zip(codes, starts)])
        lengths = (lengths - torch.tensor(starts)).clamp(max=max_frames)
    return (
        codes.to(device),
        lengths.to(device),
        split.text_emb[idx].to(device),
        split.text_mask[idx].to(device),
    )


# ----------------------------------------------------------------------------- distributed


def dist_info() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def maybe_init_distributed(device: torch.device) -> None:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        torch.distributed.init_process_group(backend)


# ----------------------------------------------------------------------------- resume


def check_resume_compatible(cfg: RunConfig, ckpt: dict, run_dir: Path) -> None:
    a = _without(config_from_dict(ckpt["config"], str(RunDir(run_dir).checkpoint_file)).to_dict(), RESUME_IGNORED)
    b = _without(cfg.to_dict(), RESUME_IGNORED)
    diffs = diff_keys(a, b)
    if diffs:
        raise ValueError(
            f"{RunDir(run_dir).checkpoint_file}: cannot resume, the config differs from the checkpoint's: "
            + "; ".join(diffs)
        )


def check_budget_unchanged(cfg: RunConfig, ckpt: dict, rd: RunDir, extend: bool, say: bool) -> None:
    """The LR schedule is laid over the budget: resuming under another budget bends it mid-run.
    Refused unless `extend`, which continues with the schedule re-laid over the new budget."""
    old = ckpt["config"].get("train", {})
    new = cfg.to_dict()["train"]
    changed = [f"train.{k}: {old.get(k)!r} -> {new[k]!r}" for k in ("steps", "budget") if old.get(k) != new[k]]
    if not changed:
        return
    if not extend:
        raise ValueError(
            f"{rd.path}: the budget differs from the checkpoint's ({'; '.join(changed)}); the learning-rate "
            "schedule depends on it, so the run cannot simply continue. Pass --extend (train.run(extend=True)) "
            "to continue with the schedule re-laid over the new budget, or use a new run directory"
        )
    if say:
        print(f"extending {rd.path}: {'; '.join(changed)} (the schedule is re-laid over the new budget)",
              file=sys.stderr)


def _without(d: dict, keys) -> dict:
    d = json.loads(json.dumps(d))
    for k in keys:
        pop_dotted(d, k)
    return d


# ----------------------------------------------------------------------------- validation


def t_interval(x: torch.Tensor, level: float = 0.95) -> tuple[float, float] | None:
    """Student-t interval of the mean of `x [N]` (None when N < 2)."""
    from scipy.stats import t

    n = x.numel()
    if n < 2:
        return None
    m, se = float(x.double().mean()), float(x.double().std(unbiased=True)) / math.sqrt(n)
    h = float(t.ppf(0.5 + level / 2, n - 1)) * se
    return m - h, m + h


INFO_GAIN_FIELDS = ("val_info_gain", "val_info_gain_per_codebook", "val_info_gain_ci", "val_info_gain_n")


def info_gain_fields(gain: torch.Tensor) -> dict:
    """Log fields of the text information gain from per-clip gains `[N, K']` (nats per token):
    the mean over clips (of the mean over codebooks), per codebook, and a 95% t-interval over clips."""
    per_clip = gain.double().mean(-1)  # [N]
    ci = t_interval(per_clip)
    return {
        "val_info_gain": float(per_clip.mean()),
        "val_info_gain_per_codebook": gain.double().mean(0).tolist(),
        "val_info_gain_ci": list(ci) if ci else None,
        "val_info_gain_n": int(gain.shape[0]),
    }


@torch.no_grad()
def validate(model: nn.Module, split: Split, cfg: RunConfig, device) -> dict:
    """Validation log fields: `val_loss`, `val_loss_per_codebook` and, for an LM, the text information
    gain: per clip, the loss under the null caption minus the loss under the true caption (nats per
    token, no label smoothing), averaged over clips (`val_info_gain`, `_per_codebook`, `_ci`, `_n`)."""
    was = model.training
    model.eval()
    losses, gains = [], []
    bs = cfg.train.batch_size
    n = min(len(split), bs * cfg.train.val_batches)
    for i in range(0, n, bs):
        idx = list(range(i, min(n, i + bs)))
        codes, lengths, te, tm = batch = batch_of(split, idx, device)
        if isinstance(model, TTMLM):  # the true caption once (loss and per-clip NLL), the null caption once
            per_k, nll_true = model.validation_terms(*batch)
            null = model.clip_nll(codes, lengths, te, torch.zeros_like(tm))  # [B, K']
            gains.append((null - nll_true).float().cpu())
        else:
            _, per_k = model.loss(*batch)
        losses.append(per_k.float().cpu() * len(idx))
    model.train(was)
    per_k = (torch.stack(losses).sum(0) / n).tolist()
    out = {"val_loss": float(sum(per_k) / len(per_k)), "val_loss_per_codebook": per_k}
    if gains:
        out.update(info_gain_fields(torch.cat(gains)))
    return out


# ----------------------------------------------------------------------------- the run


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def setup_processes(cfg: RunConfig) -> tuple[torch.device, int, int]:
    """The device, this process's rank and the world size (DDP when launched by torchrun); sets the
    torch threads and the allocator (`ttm.util.keep_freed_memory`)."""
    keep_freed_memory()
    device = pick_device(cfg.train.device)
    maybe_init_distributed(device)
    rank, world = dist_info()
    if world > 1 and device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    if cfg.train.batch_size % world:
        raise ValueError(f"train.batch_size {cfg.train.batch_size} is not divisible by {world} processes")
    return device, rank, world


def make_optimizer(model: nn.Module, cfg: RunConfig, horizon: int):
    """AdamW with no-decay groups, warm-up + cosine over `horizon` steps, and the EMA (or None)."""
    opt = adamw(model, cfg.train.weight_decay, lr=cfg.train.lr, betas=tuple(cfg.train.betas))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lr_lambda(cfg.train.warmup, horizon, cfg.train.min_lr_ratio)
    )
    ema = (
        torch.optim.swa_utils.AveragedModel(
            model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(cfg.train.ema)
        )
        if cfg.train.ema
        else None
    )
    return opt, sched, ema


def run(cfg: RunConfig, run_dir: Path, data: Prepared | None = None, progress: bool = True,
        extend: bool = False) -> dict:
    """Train (or resume) one model into `run_dir`; returns the summary dict. (A two-stage config
    trains two models: ttm.runs.train dispatches it to ttm.two_stage.run_two_stage.)

    The run directory is locked while training. Resuming with a different budget is refused
    unless `extend` (the learning-rate schedule depends on the budget). SIGINT/SIGTERM finish the
    current step, write a checkpoint, then raise KeyboardInterrupt / ttm.util.Terminated."""
    if cfg.model.kind == "two_stage":
        raise ValueError("model.kind=two_stage trains two models: use ttm.runs.train "
                         "(ttm.two_stage.run_two_stage), not ttm.train.run")
    rd = RunDir(run_dir)
    if int(os.environ.get("RANK", "0")) != 0:  # DDP: rank 0 holds the lock for all ranks
        return _run(cfg, rd, data, progress, extend)
    with rd.lock():
        return _run(cfg, rd, data, progress, extend)


def _run(cfg: RunConfig, rd: RunDir, data: Prepared | None, progress: bool, extend: bool) -> dict:
    run_dir = rd.path
    device, rank, world = setup_processes(cfg)

    data = data or prepare(cfg, progress=progress and rank == 0)
    train, valid = data.splits["train"], data.splits.get("valid")
    codec = data.codec
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, codec.n_codebooks, codec.cardinality, data.text_dim, data=data).to(device)
    max_frames = (
        int(round(cfg.data.max_seconds * codec.frame_rate)) if cfg.data.max_seconds else None
    )
    T = min(train.codes.shape[-1], max_frames or 10**9)
    text_len = train.text_emb.shape[1]
    B, accum = cfg.train.batch_size, cfg.train.grad_accum
    local_B = B // world

    # FLOPs of one optimizer step (global batch), counted once on a probe batch of fixed shape
    probe = batch_of(train, list(range(min(len(train), local_B))), device, max_frames,
                     torch.Generator().manual_seed(0))
    fl = count_train_step_flops(model, *probe)
    scale = (B * accum) / probe[0].shape[0]
    flops_per_step = int(fl["total"] * scale)
    tokens_per_step = B * accum * T
    budget = cfg.train.budget
    horizon = {
        "steps": lambda: int(budget.limit),
        "tokens": lambda: math.ceil(budget.limit / tokens_per_step),
        "flops": lambda: math.ceil(budget.limit / flops_per_step),
        "seconds": lambda: cfg.train.steps,
    }[budget.kind]()
    opt, sched, ema = make_optimizer(model, cfg, horizon)
    gen = torch.Generator().manual_seed(cfg.seed + 1)  # caption dropout and crops
    counters = {"step": 0, "tokens": 0, "flops": 0, "train_time": 0.0}
    pos = {"epoch": 0, "idx": 0}
    best_val = None
    log_path = rd.log_file
    if rd.has_checkpoint():
        ck = rd.load_checkpoint()
        check_resume_compatible(cfg, ck, run_dir)
        check_budget_unchanged(cfg, ck, rd, extend, progress and rank == 0)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        if ema is not None and ck.get("ema") is not None:
            ema.load_state_dict(ck["ema"])
        torch.set_rng_state(ck["rng"]["torch"])
        gen.set_state(ck["rng"]["gen"])
        counters, pos, best_val = ck["counters"], ck["data_pos"], ck.get("best_val")
        _truncate_log(log_path, counters["step"])
        if rank == 0 and progress:
            print(f"resumed {run_dir} at step {counters['step']}", file=sys.stderr)
    elif rank == 0:
        log_path.unlink(missing_ok=True)
    if rank == 0:
        rd.write_config(cfg)

    ddp = (
        torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        if world > 1
        else model
    )
    use_bf16 = device.type == "cuda" and cfg.train.bf16 in (True, "auto")

    def used() -> float:
        return {"steps": counters["step"], "tokens": counters["tokens"], "flops": counters["flops"],
                "seconds": counters["train_time"]}[budget.kind]

    def checkpoint() -> None:
        if rank != 0:
            return
        rd.save_checkpoint({
            "model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
            "ema": ema.state_dict() if ema is not None else None,
            "rng": {"torch": torch.get_rng_state(), "gen": gen.get_state()},
            "counters": dict(counters), "data_pos": dict(pos), "best_val": best_val,
            "config": cfg.to_dict(),
        })

    status, message = "ok", ""
    loggers = open_loggers(cfg.train.loggers, run_dir, cfg.to_dict()) if rank == 0 else []
    bar = None
    if progress and rank == 0:
        bar = progress_bar(total=horizon if budget.kind == "steps" else None, initial=counters["step"],
                   desc=f"train {cfg.model.backbone}", leave=False, file=sys.stderr)
    model.train()
    with stop_on_signals() as stop:
        while used() < budget.limit:
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            per_k_sum = None
            for _ in range(accum):
                idx = next_indices(pos, len(train), B, cfg.seed)
                idx = idx[rank * local_B : (rank + 1) * local_B]
                batch = batch_of(train, idx, device, max_frames, gen)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
                    loss, per_k = _loss(ddp, model, batch, gen)
                (loss / accum).backward()
                per_k_sum = per_k.detach() if per_k_sum is None else per_k_sum + per_k.detach()
            per_k = (per_k_sum / accum)
            if world > 1:
                torch.distributed.all_reduce(per_k)
                per_k /= world
            if not torch.isfinite(per_k).all():
                status = "diverged"
                message = (f"loss became {per_k.tolist()} at step {counters['step'] + 1}; stopped, the last "
                           f"good checkpoint (step {rd.checkpoint_step()}) is kept")
                break
            if cfg.train.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
            opt.step()
            sched.step()
            if ema is not None:
                ema.update_parameters(model)
            counters["step"] += 1
            counters["tokens"] += tokens_per_step
            counters["flops"] += flops_per_step
            counters["train_time"] += time.perf_counter() - t0
            step = counters["step"]
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{per_k.mean().item():.3f}")
            row = None
            last = used() >= budget.limit
            if step % cfg.train.log_every == 0 or step == 1 or last:
                row = _log_row(step, per_k, sched, counters)
            if valid is not None and len(valid) and (step % cfg.train.eval_every == 0 or last):
                val = validate(_eval_model(model, ema), valid, cfg, device)
                vl = val["val_loss"]
                row = row or _log_row(step, per_k, sched, counters)
                row.update(val)
                if not math.isfinite(vl):
                    status, message = "diverged", f"validation loss is {vl} at step {step}; stopped"
                best_val = vl if best_val is None or vl < best_val else best_val
            if row is not None and rank == 0:
                with open(log_path, "a") as f:
                    f.write(json.dumps(row) + "\n")
                for lg in loggers:
                    lg.log(step, row)
            if status != "ok":
                break
            if step % cfg.train.ckpt_every == 0 or last:
                checkpoint()
            elif stop:  # SIGINT/SIGTERM: keep this step's work, then stop
                checkpoint()
            if stop:
                if rank == 0:
                    print(f"stopped at step {step}: checkpoint written, resume with the same command",
                          file=sys.stderr)
                break
    for lg in loggers:
        lg.close()
    if bar is not None:
        bar.close()
    if stop:
        stop.raise_()  # the run is not finished: no summary, the checkpoint resumes it

    summary = make_summary(cfg, model, data, counters, budget, status, message, log_path, T, text_len,
                           flops_per_step, fl)
    if rank == 0:
        rd.write_summary(summary)
        if status != "ok":
            print(f"warning: {message}", file=sys.stderr)
    return summary


def _log_row(step: int, per_k: torch.Tensor, sched, counters: dict) -> dict:
    return {"step": step, "loss": per_k.mean().item(), "loss_per_codebook": per_k.tolist(),
            "lr": sched.get_last_lr()[0], "tokens": counters["tokens"], "flops": counters["flops"],
            "wall_time": counters["train_time"]}


def _loss(ddp, model: TTMLM, batch, gen):
    # under DDP the logits must come through the wrapper's forward (gradient sync hooks)
    return model.loss(*batch, generator=gen, forward=None if ddp is model else ddp)


def _eval_model(model, ema):
    return ema.module if ema is not None else model


def _truncate_log(path: Path, step: int) -> None:
    """Drop log rows written after the checkpoint we resume from (they will be redone), and
    damaged lines (named on stderr)."""
    if not path.exists():
        return
    rows = [r for r in read_log(path) if r["step"] <= step]
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


def make_summary(cfg, model, data, counters, budget, status, message, log_path, T, text_len,
                 flops_per_step, fl) -> dict:
    rows = read_log(log_path)
    vals = [r for r in rows if "val_loss" in r]
    reach = {}
    for thr in cfg.train.flops_thresholds:
        hit = next((r for r in vals if r["val_loss"] <= thr), None)
        reach[str(thr)] = hit["flops"] if hit else None
    limits_hit = {
        "steps": counters["step"], "tokens": counters["tokens"], "flops": counters["flops"],
        "seconds": counters["train_time"],
    }
    return {
        "name": cfg.name,
        "status": status,
        "message": message,
        "backbone": cfg.model.backbone,
        "backbone_config": model.backbone.config(),
        "kernel_paths": kernel_paths(model.backbone),  # which kernel/reference path each mixer ran
        "malloc": keep_freed_memory(),  # what the allocator did (speed only: the same bits either way)
        "conditioning": cfg.model.conditioning,
        "pattern": cfg.model.pattern,
        "params": count_params(model),
        "non_embedding_params": model.non_embedding_params(),
        "target_params": cfg.model.target_params,
        "steps": counters["step"],
        "tokens": counters["tokens"],
        "flops": counters["flops"],
        "flops_per_step": flops_per_step,
        "flops_per_step_counted": fl["counted"],
        "flops_per_step_scan": fl["scan"],
        "flops_per_token_analytic": analytic_flops_per_token(model, T, text_len, "train"),
        "budget": {"kind": budget.kind, "limit": budget.limit, "used": limits_hit[budget.kind],
                   "binding": budget.kind, "all": limits_hit},
        "val_loss": vals[-1]["val_loss"] if vals else None,
        "val_loss_per_codebook": vals[-1]["val_loss_per_codebook"] if vals else None,
        "best_val_loss": min((r["val_loss"] for r in vals), default=None),
        **{k: vals[-1].get(k) if vals else None for k in INFO_GAIN_FIELDS},
        "flops_to_reach": reach,
        "train_time_s": counters["train_time"],
        "frames_per_clip": T,
        "codec": data.codec.identity(),
        "manifest": str(data.manifest),
        "config_hash": cfg.hash(),
    }
