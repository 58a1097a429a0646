"""One cell of a study: train -> generate for held-out captions -> evaluate.

Each phase is skipped when its output already exists, so a killed cell resumes where it
stopped (training itself resumes from its checkpoint).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from eval.probe import train_probe
from eval.runner import evaluate
from ttm import prepare as prep  # a module reference: tests substitute its data products
from ttm import runs
from ttm.config import RunConfig, config_from_dict
from ttm.rundir import RunDir
from ttm.sample import prompts_from_split
from ttm.util import file_lock

PROBE_METRICS = ("fd_probe", "adherence", "kl_probe", "clap_probe")


def probe_for(cfg: RunConfig, manifest: Path, progress: bool = True) -> Path | None:
    """The dataset's probe evaluator: one per dataset (trained once, on its train split, with the
    dataset seed), shared by every run and seed evaluated against it."""
    if cfg.eval.probe_path:
        return Path(cfg.eval.probe_path)
    if not any(m in PROBE_METRICS for m in cfg.eval.metrics):
        return None
    path = manifest.parent / "probe.pt"
    with file_lock(manifest.parent / ".probe.lock"):  # parallel workers train it once
        train_probe(manifest, path, seed=cfg.data.seed, progress=progress)
    return path


def run_cell(cfg: RunConfig, run_dir: Path, progress: bool = True) -> dict:
    rd = RunDir(run_dir)
    data = prep.prepare(cfg, progress=progress)
    summary = rd.read_summary() if rd.state != "new" else None
    if summary is None or summary.get("status") != "ok":
        summary = runs.train(cfg, rd.path, data=data, progress=progress)
    if summary["status"] != "ok":
        return summary

    # generation with the trained weights (EMA when enabled), for any model kind
    samples = rd.samples_dir
    g = cfg.generate
    if not rd.has_samples():
        prompts = prompts_from_split(data, g.split, g.n_clips)
        summary["generation"] = runs.generate(rd.path, prompts, samples, data=data, seed=cfg.seed,
                                              progress=progress)
        rd.write_summary(summary)

    # evaluation against the reference split
    if cfg.eval.metrics and not rd.eval_file.exists():
        res = evaluate(
            samples, data.manifest, cfg.eval.metrics, rd.eval_file,
            probe_path=probe_for(cfg, data.manifest, progress), split=g.split, codec=data.codec,
            seed=cfg.seed, progress=progress, cache_dir=data.manifest.parent / "cache",
        )
    elif rd.eval_file.exists():
        res = json.loads(rd.eval_file.read_text())
    else:
        res = {}
    summary["metrics"] = res.get("metrics", res)
    if "probe" in res:
        summary["probe"] = res["probe"]
    rd.write_summary(summary)
    return summary


def pipeline_cell(config: dict, run_dir: Path) -> dict:
    """The grid's default cell: validate the config as a RunConfig, then train + generate + evaluate.
    Datasets live with the grid (GRID/data) unless the config sets data.root: the location is not
    part of the cell's settings, so it changes no cell name."""
    progress = os.environ.get("TTM_BENCH_PROGRESS", "1") != "0"  # set by run_grid(progress=False)
    run_dir = Path(run_dir)
    cfg = config_from_dict(config, str(run_dir / "cell.yaml"))
    if "root" not in cfg.data.model_fields_set:
        grid_dir = run_dir.resolve().parent.parent  # GRID/cells/NAME
        cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"root": str(grid_dir / "data")})})
    return run_cell(cfg, run_dir, progress=progress)
