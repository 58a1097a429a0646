"""One cell of a study: train -> generate for held-out captions -> evaluate.

Each phase is skipped when its output already exists, so a killed cell resumes where it
stopped (training itself resumes from its checkpoint).
"""

from __future__ import annotations

import json
from pathlib import Path

from ttm.audio import atomic_write_text
from ttm.config import RunConfig


PROBE_METRICS = ("fd_probe", "adherence", "kl_probe", "clap_probe")


def probe_for(cfg: RunConfig, manifest: Path, progress: bool = True) -> Path | None:
    """The dataset's probe evaluator: one per dataset (trained once, on its train split, with the
    dataset seed), shared by every run and seed evaluated against it."""
    if cfg.eval.probe_path:
        return Path(cfg.eval.probe_path)
    if not any(m in PROBE_METRICS for m in cfg.eval.metrics):
        return None
    from eval.probe import train_probe

    path = manifest.parent / "probe.pt"
    train_probe(manifest, path, seed=cfg.data.seed, progress=progress)
    return path


def run_cell(cfg: RunConfig, run_dir: Path, progress: bool = True) -> dict:
    from ttm.prepare import build_text_encoder_for, prepare
    from ttm.sample import generate_clips, prompts_from_split
    from ttm.train import load_weights, run

    run_dir = Path(run_dir)
    data = prepare(cfg, progress=progress)
    summary_path = run_dir / "summary.json"
    done = summary_path.exists() and json.loads(summary_path.read_text()).get("status") == "ok"
    summary = json.loads(summary_path.read_text()) if done else run(cfg, run_dir, data=data, progress=progress)
    if summary["status"] != "ok":
        return summary

    # generation with the trained weights (EMA when enabled)
    samples = run_dir / "samples"
    g = cfg.generate
    prompts = prompts_from_split(data, g.split, g.n_clips)
    if not (samples / "samples.jsonl").exists() and cfg.model.kind == "two_stage":
        from ttm.two_stage import generate_for_run

        summary["generation"] = generate_for_run(run_dir, prompts, samples, data=data, seconds=g.seconds,
                                                 seed=cfg.seed, progress=progress)
        atomic_write_text(summary_path, json.dumps(summary, indent=2))
    if not (samples / "samples.jsonl").exists():
        from ttm.train import build_model

        model = build_model(cfg, data.codec.n_codebooks, data.codec.cardinality, data.text_dim)
        load_weights(model, run_dir)
        model.eval()
        seconds = g.seconds or cfg.data.max_seconds or data.splits["train"].codes.shape[-1] / data.codec.frame_rate
        summary["generation"] = generate_clips(
            model, data.codec, build_text_encoder_for(cfg), prompts, samples, seconds,
            cfg_scale=g.cfg_scale, top_k=g.top_k, top_p=g.top_p, temperature=g.temperature,
            seed=cfg.seed, max_text_len=cfg.text.max_length, progress=progress,
        )
        atomic_write_text(summary_path, json.dumps(summary, indent=2))

    # evaluation against the reference split
    eval_path = run_dir / "eval.json"
    if cfg.eval.metrics and not eval_path.exists():
        from eval.runner import evaluate

        res = evaluate(
            samples, data.manifest, cfg.eval.metrics, eval_path,
            probe_path=probe_for(cfg, data.manifest, progress), split=g.split, codec=data.codec,
            seed=cfg.seed, progress=progress, cache_dir=data.manifest.parent / "cache",
        )
    elif eval_path.exists():
        res = json.loads(eval_path.read_text())
    else:
        res = {}
    summary["metrics"] = res.get("metrics", res)
    if "probe" in res:
        summary["probe"] = res["probe"]
    atomic_write_text(summary_path, json.dumps(summary, indent=2))
    return summary
