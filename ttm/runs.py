"""Runs of any model kind: the one place that dispatches on `model.kind`.

    kind        trains                             generates with
    lm          ttm.train.run (one TTMLM)          ttm.sample.generate_clips
    two_stage   ttm.two_stage.run_two_stage        ttm.two_stage.generate_two_stage
                (stage 1 and stage 2, each by ttm.train.run)
    diffusion   ttm.train.run (stage 2 alone)      (only through its two-stage run)

CLI verbs: `ttm-bench train CONFIG.yaml [--set key=value ...] [--out RUN_DIR] [--nproc N]` and
`ttm-bench generate RUN (--prompt TEXT | --prompts FILE | --split test) --out DIR`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from ttm import prepare as prep  # a module reference: tests substitute its data products
from ttm.config import RunConfig, load_config
from ttm.factory import build_model
from ttm.lm import TTMLM
from ttm.prepare import Prepared
from ttm.rundir import RunDir
from ttm.sample import (
    check_clip_length,
    check_output_dir,
    clip_frames,
    generate_clips,
    prompts_from_split,
    read_prompts,
)
from ttm.train import dist_info
from ttm.train import run as train_one
from ttm.two_stage import generate_two_stage, load_two_stage, run_two_stage

SAMPLING = ("cfg_scale", "top_k", "top_p", "temperature")  # GenerateConfig fields a caller may override
DIFFUSION_SAMPLING = ("steps", "sampler", "diffusion_cfg_scale")  # two-stage runs only


def train(cfg: RunConfig, run_dir: str | Path, data: Prepared | None = None, progress: bool = True,
          extend: bool = False) -> dict:
    """Train (or resume) a run of any kind into `run_dir`; returns its summary. `extend`: allow
    resuming under a changed budget (see ttm.train.run)."""
    if cfg.model.kind == "two_stage":
        return run_two_stage(cfg, run_dir, data=data, progress=progress, extend=extend)
    return train_one(cfg, Path(run_dir), data=data, progress=progress, extend=extend)


def load_lm(run_dir: str | Path, device: str = "cpu", data: Prepared | None = None) -> tuple[RunConfig, TTMLM, Prepared]:
    """Rebuild a trained single-model run (EMA weights when present) and its data products."""
    rd = RunDir(run_dir)
    if not rd.has_checkpoint():
        raise FileNotFoundError(f"{rd.path}: no {rd.checkpoint_file.name} (is this a trained run directory?)")
    cfg = rd.read_config()
    data = data or prep.prepare(cfg, progress=False)
    model = rd.load_weights(build_model(cfg, data.codec.n_codebooks, data.codec.cardinality, data.text_dim, data=data))
    return cfg, model.to(device).eval(), data


def trained_frames(rd: RunDir) -> int | None:
    """Frames per training clip, from the run's summary (a two-stage run: its stage 1)."""
    for s in (rd.read_summary(), rd.stage("stage1").read_summary()):
        if s and s.get("frames_per_clip"):
            return int(s["frames_per_clip"])
    return None


def generate(run_dir: str | Path, prompts: list[dict], out_dir: str | Path, data: Prepared | None = None,
             seconds: float | None = None, seed: int | None = None, device: str = "cpu", batch_size: int = 8,
             progress: bool = True, allow_long: bool = False, compile_step: bool = False,
             **options: Any) -> dict:
    """Generate one clip per prompt with a trained run of any kind into `out_dir`; returns timings.

    `options`: cfg_scale, top_k, top_p, temperature (override the run's `generate` config) and,
    for two-stage runs, steps, sampler, diffusion_cfg_scale. None values are ignored; `seed`
    defaults to the run's seed; the clip length follows `ttm.sample.clip_frames`; clips far longer
    than the training clips need `allow_long` (see ttm.sample.check_clip_length); `compile_step`
    decodes through torch.compile (`Backbone.compiled_step`; the result says which step ran)."""
    if seconds is not None and seconds <= 0:
        raise ValueError(f"--seconds: expected > 0, got {seconds}")
    if batch_size < 1:
        raise ValueError(f"--batch-size: expected >= 1, got {batch_size}")
    check_output_dir(Path(out_dir))
    rd = RunDir(run_dir)
    cfg = rd.read_config() if rd.config_file.is_file() else None
    if cfg is None:
        raise FileNotFoundError(f"{rd.path}: no {rd.config_file.name} (is this a trained run directory?)")
    options = {k: v for k, v in options.items() if v is not None}
    kind = cfg.model.kind
    allowed = SAMPLING + (DIFFUSION_SAMPLING if kind == "two_stage" else ())
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"{rd.path}: generation options {unknown} do not apply to a {kind} run "
                         f"(expected some of {list(allowed)})")
    if kind == "diffusion":
        raise ValueError(f"{rd.path}: a stage-2 run generates only with its stage-1 LM: "
                         f"generate from the two-stage run directory {rd.path.parent}")
    gen = cfg.generate.model_copy(update={k: options[k] for k in SAMPLING if k in options})
    common = dict(seed=cfg.seed if seed is None else seed, batch_size=batch_size,
                  max_text_len=cfg.text.max_length, progress=progress, compile_step=compile_step)
    if kind == "two_stage":
        cfg, lm, diff, data = load_two_stage(rd.path, device, data)
        n_frames = clip_frames(cfg, data, seconds)
        check_clip_length(n_frames, trained_frames(rd), data.codec.frame_rate, allow_long)
        extra = {k: options.get(k) for k in DIFFUSION_SAMPLING}
        return generate_two_stage(lm, diff, data.codec, prep.build_text_encoder_for(cfg), prompts, Path(out_dir),
                                  n_frames, gen, **extra, **common)
    cfg, model, data = load_lm(rd.path, device, data)
    n_frames = clip_frames(cfg, data, seconds)
    check_clip_length(n_frames, trained_frames(rd), data.codec.frame_rate, allow_long)
    return generate_clips(model, data.codec, prep.build_text_encoder_for(cfg), prompts, Path(out_dir),
                          n_frames, gen, **common)


# ----------------------------------------------------------------------------- CLI


def train_cli(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="ttm-bench train", description="train one run from a YAML config")
    ap.add_argument("config", nargs="?", help="YAML run config (defaults if omitted)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    ap.add_argument("--out", help="run directory (default runs/<name or backbone>-<config hash>)")
    ap.add_argument("--nproc", type=int, default=1, help="processes (torchrun DDP); gloo on CPU")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--extend", action="store_true",
                    help="resume a run under a changed budget (the LR schedule is re-laid over it)")
    a = ap.parse_args(argv)
    cfg = load_config(a.config, a.set)
    out = Path(a.out or f"runs/{cfg.name or cfg.model.backbone}-{cfg.hash()}")
    if a.nproc > 1 and "WORLD_SIZE" not in os.environ:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={a.nproc}",
               "-m", "ttm.runs", *argv_without_nproc(argv)]
        if not a.out:
            cmd += ["--out", str(out)]
        return subprocess.call(cmd)
    s = train(cfg, out, progress=not a.no_progress, extend=a.extend)
    if dist_info()[0] == 0:
        print(json.dumps({k: s[k] for k in ("status", "steps", "params", "val_loss", "flops", "train_time_s")}))
        print(out)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return 0 if s["status"] == "ok" else 1


def argv_without_nproc(argv: list[str]) -> list[str]:
    out, skip = [], False
    for x in argv:
        if skip:
            skip = False
            continue
        if x == "--nproc":
            skip = True
            continue
        if x.startswith("--nproc="):
            continue
        out.append(x)
    return out


def generate_cli(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="ttm-bench generate", description="generate audio from captions with a trained run")
    ap.add_argument("run", help="trained run directory")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="one caption")
    src.add_argument("--prompts", help="text file (one caption per line) or JSONL with 'caption'")
    src.add_argument("--split", help="captions of this dataset split (train/valid/test)")
    ap.add_argument("--n", type=int, default=8, help="clips from --split")
    ap.add_argument("--seconds", type=float, default=None)
    ap.add_argument("--out", required=True)
    ap.add_argument("--cfg-scale", type=float, default=None)
    ap.add_argument("--top-k", type=int, default=None)
    ap.add_argument("--top-p", type=float, default=None)
    ap.add_argument("--temperature", type=float, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--steps", type=int, default=None, help="two-stage runs: diffusion sampling steps")
    ap.add_argument("--sampler", choices=["ddim", "ancestral"], default=None, help="two-stage runs: diffusion sampler")
    ap.add_argument("--diffusion-cfg-scale", type=float, default=None, help="two-stage runs: stage-2 guidance")
    ap.add_argument("--allow-long", action="store_true",
                    help="generate clips more than 10x longer than the training clips")
    ap.add_argument("--compile-step", action="store_true",
                    help="decode through torch.compile: ~2x faster per token for the SSMs at small sizes, "
                         "after 5-30 s of compiling once per process (counted in lm_time_s), so it pays for "
                         "long or many clips; equal to float tolerance (`bench --only decode_compiled`)")
    a = ap.parse_args(argv)
    for opt, v, lo in (("--n", a.n, 1), ("--batch-size", a.batch_size, 1), ("--steps", a.steps, 1)):
        if v is not None and v < lo:
            ap.error(f"{opt}: expected >= {lo}, got {v}")
    if a.seconds is not None and a.seconds <= 0:
        ap.error(f"--seconds: expected > 0, got {a.seconds}")
    check_output_dir(Path(a.out))  # before the minutes of loading, not after
    rd = RunDir(a.run)
    if not rd.config_file.is_file():
        raise FileNotFoundError(f"{rd.path}: no {rd.config_file.name} (is this a trained run directory?)")
    data = prep.prepare(rd.read_config(), progress=False)
    if a.prompt:
        prompts = [{"caption": a.prompt, "attributes": {}}]
    elif a.prompts:
        prompts = read_prompts(Path(a.prompts))
    else:
        prompts = prompts_from_split(data, a.split, a.n)
    info = generate(
        rd.path, prompts, a.out, data=data, seconds=a.seconds, seed=a.seed, device=a.device,
        batch_size=a.batch_size, cfg_scale=a.cfg_scale, top_k=a.top_k, top_p=a.top_p,
        temperature=a.temperature, steps=a.steps, sampler=a.sampler, diffusion_cfg_scale=a.diffusion_cfg_scale,
        allow_long=a.allow_long, compile_step=a.compile_step,
    )
    print(json.dumps(info))
    print(Path(a.out) / "samples.jsonl")
    return 0


if __name__ == "__main__":  # torchrun entry point of `ttm-bench train --nproc N`
    sys.exit(train_cli(sys.argv[1:]))
