"""The comparison report of a grid, a demo dir or a single run.

    ttm-bench report DIR [--out OUT] [--clip-seconds S] [--max-captions N]
    ttm-bench report GRID --beside reports/results/NAME [--out OUT]     (reports/shipped.py)

DIR is a grid dir (`DIR/cells/*`), a demo dir (`DIR/runs/*`), or one run dir (with summary.json);
cells and runs are treated the same. Writes `OUT/report.md` (plots as PNG files under
`OUT/report_files/`) and a self-contained `OUT/report.html` (plots as base64 PNG, audio clips as
base64 WAV); OUT is DIR unless given. Groups are all axes except the seed: for a grid the axes come
from each cell's cell.json; elsewhere they are the config keys whose values differ between runs
(seed excluded).
Numbers are means over seeds with a 95% Student-t interval; with one seed a metric shows the
evaluation's own bootstrap CI, labelled as such. Anything missing is "n/a (reason)".
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from reports.listening import listening
from reports.render import Doc, render_html, render_md
from reports.results import (
    HIGHER_IS_BETTER_PREFIXES,
    LOWER_IS_BETTER_PREFIXES,
    as_number,
    collect,
    curves,
    metric_names,
    read_json,
    write_results,
)
from reports.tables import fmt, group_table, metric_floor, unequal_n
from ttm.rundir import RunDir
from ttm.util import atomic_write_text

# ----------------------------------------------------------------------------- the report


def _direction_note(metrics: list[str]) -> str:
    parts = []
    for m in metrics:
        if m.startswith(HIGHER_IS_BETTER_PREFIXES):
            parts.append(f"{m}: higher is better")
        elif m.startswith(LOWER_IS_BETTER_PREFIXES):
            parts.append(f"{m}: lower is better")
    return "; ".join(parts)


def build_report(
    root: Path,
    clip_seconds: float = 5.0,
    max_captions: int = 3,
    max_clips: int = 24,
    out_dir: Path | None = None,
    listen: bool = True,
    html: bool = True,
) -> Path:
    """Write `OUT/report.md` (+ `OUT/report_files/*.png`) and a self-contained `OUT/report.html` for
    the runs under `root` (OUT: `out_dir`, default `root`). `listen=False` leaves out the listening
    table (no audio is read or linked); `html=False` writes no HTML. Returns the HTML path, or the
    Markdown path without HTML."""
    root = Path(root)
    manifest = read_json(root / "grid.json") if (root / "grid.json").is_file() else {}
    return write_report(
        collect(root),
        root,
        Path(out_dir) if out_dir is not None else root,
        f"Comparison report: {manifest.get('name') or root.name}",
        f"Source: {root}.",
        manifest,
        clip_seconds,
        max_captions,
        max_clips,
        listen,
        html,
    )


def write_report(
    df,
    root: Path,
    out_dir: Path,
    title: str,
    source: str,
    manifest: dict | None = None,
    clip_seconds: float = 5.0,
    max_captions: int = 3,
    max_clips: int = 24,
    listen: bool = True,
    html: bool = True,
    notes: list[str] | None = None,
) -> Path:
    """The report of results rows `df` (a `collect` frame) whose `run_dir`s are relative to `root`
    (training curves, samples and search_best.json are read there), written to `out_dir`.
    `source` opens the report; `notes` are paragraphs after it."""
    from reports import plots

    root, out_dir = Path(root), Path(out_dir)
    manifest = manifest or {}
    doc = Doc(title)
    status = df["status"].value_counts().to_dict()
    doc.p(
        f"{source} {len(df)} run(s): "
        + ", ".join(f"{v} {k}" for k, v in status.items())
        + "."
        + (
            f" Grid mode: {manifest.get('mode')}, preset: {manifest.get('preset') or 'none'}."
            if manifest
            else ""
        )
    )
    for n in notes or []:
        doc.p(n)

    doc.h("Comparison")
    doc.p(
        "One row per group (all axes except the seed). Values are means over the seeds that completed, "
        "with a 95% Student-t interval over seeds in brackets; with a single seed a metric shows the "
        "evaluation's bootstrap CI, marked '(eval CI, 1 seed)'. The noise floor is the metric computed "
        "between two halves of the reference set: differences below it are not meaningful; 'resolvable diff' "
        "is the smallest difference between two rows at this n that the evaluation resolves (sqrt 2 x its "
        "interval half-width). "
        + _direction_note(metric_names(df))
    )
    headers, rows = group_table(df)
    doc.table(headers, rows)
    unequal = unequal_n(df)
    if unequal:
        doc.p("NOT COMPARABLE: " + "; ".join(f"{m} was evaluated with different numbers of clips across runs "
                                               f"(n = {', '.join(map(str, ns))})" for m, ns in unequal.items())
              + ". FD at n and every interval depend on n; compare rows only at equal n.")

    bad = df[df["status"] != "complete"]
    if not bad.empty:
        doc.h("Runs not complete")
        doc.table(
            ["run", "status", "error"], [[r["run"], r["status"], r["error"] or ""] for _, r in bad.iterrows()]
        )

    best = read_json(root / "search_best.json") if (root / "search_best.json").is_file() else None
    if best:
        doc.h("Search: best config per group")
        doc.table(
            ["group", "metric", "best value", "params", "trials complete", "run"],
            [
                [
                    g,
                    f"{b['metric']} ({b['direction']})",
                    fmt(as_number(b.get("value")))
                    if b.get("value") is not None
                    else f"n/a ({b.get('reason', 'no value')})",
                    json.dumps(b.get("params", {})),
                    str(b.get("n_complete")),
                    str(b.get("cell") or ""),
                ]
                for g, b in best.items()
            ],
        )

    doc.h("Training curves")
    cv = curves(df, root)
    made = False
    for x in ("step", "flops"):
        png = plots.loss_curves(cv, x)
        if png:
            doc.img(f"val_loss_vs_{x}.png", png, f"validation loss vs {x}")
            made = True
    if not made:
        doc.p("n/a (no run logged a validation loss in log.jsonl)")

    done = df[df["status"] == "complete"]
    metrics = metric_names(df)
    doc.h("Metrics per group")
    if not metrics:
        doc.p("n/a (no run has evaluation metrics in summary.json)")
    for m in metrics:
        png = plots.metric_bars(done, f"metric.{m}", m, metric_floor(df, m))
        if png:
            doc.img(f"metric_{m}.png", png, f"{m} per group")
        else:
            doc.p(f"{m}: n/a (no complete run has a value)")

    series = [("val_loss", "val loss", None)] + [(f"metric.{m}", m, metric_floor(df, m)) for m in metrics]
    if "steps" in done and done["steps"].dropna().nunique() > 1:
        doc.h("Metrics vs training steps")
        for col, name, floor in series:
            png = plots.metric_vs(done, "steps", col, name, floor, xlabel="training steps")
            if png:
                doc.img(f"{name.replace(' ', '_')}_vs_steps.png", png, f"{name} vs steps")

    if "params" in done and "family" in done and (done.groupby("family")["params"].nunique() > 1).any():
        doc.h("Scaling down: metric vs parameter count")
        for col, name, floor in series:
            png = plots.metric_vs(done, "params", col, name, floor, log_x=True, xlabel="trainable parameters")
            if png:
                doc.img(f"{name.replace(' ', '_')}_vs_params.png", png, f"{name} vs parameters")

    if listen:
        doc.h("Listening: the same captions across groups")
        lis = listening(df, root, max_captions=max_captions, max_clips=max_clips, clip_seconds=clip_seconds)
        doc.audio(lis)

    files_dir = out_dir / "report_files"
    files_dir.mkdir(parents=True, exist_ok=True)
    md = out_dir / "report.md"
    atomic_write_text(md, render_md(doc, files_dir))
    if not html:
        return md
    out = out_dir / "report.html"
    atomic_write_text(out, render_html(doc))
    return out


def report_parser() -> argparse.ArgumentParser:
    """`ttm-bench report`'s arguments (reports/shipped.py adds --beside)."""
    ap = argparse.ArgumentParser(
        prog="ttm-bench report",
        description="Build report.md and a self-contained report.html for a grid or demo dir.",
    )
    ap.add_argument("dir", help="grid dir (cells/*), demo dir (runs/*) or one run dir")
    ap.add_argument("--out", help="write the report here (default: DIR)")
    ap.add_argument("--clip-seconds", type=float, default=5.0, help="seconds of audio per embedded clip")
    ap.add_argument("--max-captions", type=int, default=3, help="captions in the listening table")
    ap.add_argument("--max-clips", type=int, default=24, help="embedded clips at most")
    ap.add_argument("--no-results", action="store_true", help="do not (re)write results.csv/jsonl")
    return ap


def run_report(a: argparse.Namespace) -> int:
    """`ttm-bench report DIR` with parsed arguments."""
    root = Path(a.dir)
    if not a.no_results and not RunDir(root).summary_file.is_file():
        write_results(root)
    out = build_report(root, a.clip_seconds, a.max_captions, a.max_clips, Path(a.out) if a.out else None)
    print(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB) and {out.parent / 'report.md'}")
    return 0


def cli(argv: list[str]) -> int:
    return run_report(report_parser().parse_args(argv))
