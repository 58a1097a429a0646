"""Two-stage runs: a first-k LM (stage 1) + latent diffusion (stage 2), trained one after the other.

    RUN/config.yaml      the two-stage config (model.kind: two_stage)
    RUN/stage1/          a normal LM run: pattern first_k, k = model.first_k
    RUN/stage2/          the LatentDiffusion run (model.kind: diffusion)
    RUN/summary.json     both stages: params, FLOPs, tokens, steps and time summed, each reported
    RUN/samples/         (generation) WAVs + samples.jsonl, as ttm/sample.py writes them

The budget (train.budget, and train.steps as the LR horizon) and a total
`model.target_params` are split between the stages by `model.diffusion.stage2_fraction`.
Both stages are trained by `ttm.train.run`, so they resume, log and count FLOPs like any run.

Generation: stage-1 LM samples the first-k codes -> stage 2 samples the latent given those
codes and the caption -> `codec.decode_latent` renders audio.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path

from ttm import prepare as prep  # a module reference: tests substitute its data products
from ttm.config import GenerateConfig, RunConfig, config_from_dict
from ttm.diffusion import LatentDiffusion, build_latent_diffusion, check_latent_codec
from ttm.factory import build_model
from ttm.rundir import RunDir
from ttm.sample import generate_clips
from ttm.train import dist_info, run

STAGES = ("stage1", "stage2")


# ----------------------------------------------------------------------------- configs


def _split(total: float, frac2: float, integer: bool) -> tuple[float, float]:
    """(stage-1 share, stage-2 share) of `total`; integer shares are >= 1 and sum to `total`."""
    if not integer:
        return total * (1 - frac2), total * frac2
    a = min(max(1, round(total * (1 - frac2))), max(1, int(total) - 1))
    return a, max(1, int(total) - a)


def _set_budget(d: dict, cfg: RunConfig, stage: int) -> None:
    b, f = cfg.train.budget, cfg.model.diffusion.stage2_fraction
    d["train"]["budget"] = {"kind": b.kind, "limit": _split(b.limit, f, b.kind == "steps")[stage - 1]}
    d["train"]["steps"] = _split(cfg.train.steps, f, True)[stage - 1]  # the LR horizon


def stage_configs(cfg: RunConfig) -> tuple[RunConfig, RunConfig]:
    """The stage-1 (LM, first_k) and stage-2 (diffusion only) run configs of a two-stage config."""
    if cfg.model.kind != "two_stage":
        raise ValueError("stage_configs: expected a config with model.kind=two_stage (not a stage-2 config)")
    f = cfg.model.diffusion.stage2_fraction
    total = cfg.model.target_params
    base = cfg.to_dict()

    s1 = copy.deepcopy(base)
    s1["name"] = f"{cfg.name}-stage1" if cfg.name else None
    s1["model"].update(kind="lm", pattern="first_k")
    if total:
        s1["model"]["target_params"] = round(total * (1 - f))
    _set_budget(s1, cfg, 1)

    s2 = copy.deepcopy(base)
    s2["name"] = f"{cfg.name}-stage2" if cfg.name else None
    s2["model"]["backbone"] = cfg.model.diffusion.denoiser  # the summary's "backbone" is what stage 2 trains
    s2["model"]["target_params"] = None
    s2["model"]["kind"] = "diffusion"
    if total:
        s2["model"]["diffusion"]["target_params"] = round(total * f)
    _set_budget(s2, cfg, 2)
    return config_from_dict(s1, "stage 1 of a two-stage config"), config_from_dict(s2, "stage 2 of a two-stage config")


# ----------------------------------------------------------------------------- training


def run_two_stage(cfg: RunConfig, run_dir: str | Path, data=None, progress: bool = True,
                  extend: bool = False) -> dict:
    """Train (or resume) both stages into `run_dir/stage1` and `run_dir/stage2`; returns the
    combined summary (also written to `run_dir/summary.json`)."""
    rd = RunDir(run_dir)
    c1, c2 = stage_configs(cfg)
    data = data or prep.prepare(cfg, progress=progress)
    check_latent_codec(data.codec)  # fail before stage 1 trains, not after
    rank = dist_info()[0]
    if rank == 0:
        rd.path.mkdir(parents=True, exist_ok=True)
        rd.write_config(cfg)
    s1 = run(c1, rd.stage("stage1").path, data=data, progress=progress, extend=extend)
    s2 = run(c2, rd.stage("stage2").path, data=data, progress=progress, extend=extend) if s1["status"] == "ok" else None
    summary = combine_summaries(cfg, s1, s2)
    if dist_info()[0] == 0:
        rd.write_summary(summary)
    return summary


def combine_summaries(cfg: RunConfig, s1: dict, s2: dict | None) -> dict:
    """One summary for the two-stage run: totals (sums) at the top level, each stage under `stages`."""
    stages = {"stage1": s1, "stage2": s2}
    done = [s for s in (s1, s2) if s is not None]
    if s2 is None:
        status, message = s1["status"], f"stage 1: {s1['message']}; stage 2 not trained"
    elif s2["status"] != "ok":
        status, message = s2["status"], f"stage 2: {s2['message']}"
    else:
        status, message = "ok", ""

    def total(key: str):
        return sum(s[key] for s in done)

    b = cfg.train.budget
    used = {k: sum(s["budget"]["all"][k] for s in done) for k in ("steps", "tokens", "flops", "seconds")}
    return {
        "name": cfg.name,
        "kind": "two_stage",
        "status": status,
        "message": message,
        "backbone": cfg.model.backbone,  # stage 1
        "denoiser": cfg.model.diffusion.denoiser,
        "conditioning": cfg.model.conditioning,
        "pattern": "first_k",
        "first_k": cfg.model.first_k,
        "stage2_fraction": cfg.model.diffusion.stage2_fraction,
        "params": total("params"),
        "non_embedding_params": total("non_embedding_params"),
        "target_params": cfg.model.target_params,
        "steps": total("steps"),
        "tokens": total("tokens"),
        "flops": total("flops"),
        "budget": {"kind": b.kind, "limit": b.limit, "used": used[b.kind], "binding": b.kind, "all": used},
        # the stages' validation losses measure different things (cross-entropy of the first k
        # codebooks; diffusion v-MSE): there is no single val_loss of a two-stage model
        "val_loss": None,
        "val_loss_stage1": s1.get("val_loss"),
        "val_loss_stage2": None if s2 is None else s2.get("val_loss"),
        # how much stage 1 (the LM) uses the text
        **{k: s1.get(k) for k in ("val_info_gain", "val_info_gain_per_codebook", "val_info_gain_ci",
                                  "val_info_gain_n")},
        "train_time_s": total("train_time_s"),
        "frames_per_clip": s1.get("frames_per_clip"),
        "codec": s1.get("codec"),
        "manifest": s1.get("manifest"),
        "config_hash": cfg.hash(),
        "stages": stages,
    }


# ----------------------------------------------------------------------------- loading


def load_two_stage(run_dir: str | Path, device: str = "cpu", data=None):
    """-> (cfg, stage-1 TTMLM, stage-2 LatentDiffusion, Prepared), weights loaded (EMA when present), eval mode."""
    rd = RunDir(run_dir)
    cfg = rd.read_config() if rd.config_file.is_file() else None
    if cfg is None or cfg.model.kind != "two_stage":
        raise FileNotFoundError(f"{rd.path}: not a two-stage run directory (config.yaml with model.kind: two_stage)")
    for st in STAGES:
        if not rd.stage(st).config_file.exists():
            raise FileNotFoundError(f"{rd.stage(st).path}: missing (train the two-stage run first)")
    s1, s2 = rd.stage("stage1"), rd.stage("stage2")
    c1, c2 = s1.read_config(), s2.read_config()
    data = data or prep.prepare(cfg, progress=False)
    lm = s1.load_weights(build_model(c1, data.codec.n_codebooks, data.codec.cardinality, data.text_dim))
    # the latent statistics come from the checkpoint
    diff = s2.load_weights(build_latent_diffusion(c2, data.codec, data.text_dim))
    return cfg, lm.to(device).eval(), diff.to(device).eval(), data


# ----------------------------------------------------------------------------- generation


def generate_two_stage(lm, diffusion: LatentDiffusion, codec, encoder, prompts: list[dict], out_dir: Path,
                       n_frames: int, gen: GenerateConfig, steps: int | None = None, sampler: str | None = None,
                       diffusion_cfg_scale: float | None = None, **kw) -> dict:
    """One clip per prompt: LM -> first-k codes -> diffusion latent (`steps`, `sampler`,
    `diffusion_cfg_scale`; None: the model's own) -> codec.decode_latent, through
    ttm.sample.generate_clips (`kw`: seed, batch_size, max_text_len, progress). Returns timings."""

    def latent_then_decode(codes, emb, mask, g):
        t0 = time.perf_counter()
        z = diffusion.sample(codes, emb, mask, steps=steps, sampler=sampler, cfg_scale=diffusion_cfg_scale,
                             generator=g)  # [b, Dl, T]
        t1 = time.perf_counter()
        wav = codec.decode_latent(z)  # [b, C, N]
        return wav, {"diffusion": t1 - t0, "decode": time.perf_counter() - t1}

    info = generate_clips(lm, codec, encoder, prompts, out_dir, n_frames, gen, render_codes=latent_then_decode,
                          desc="generate (two-stage)", **kw)
    info["diffusion_steps"] = diffusion.sample_steps if steps is None else int(steps)
    return info
