"""The comparison report of a grid, a demo dir or a single run.

    ttm-bench report DIR [--clip-seconds S] [--max-captions N]

DIR is a grid dir (`DIR/cells/*`), a demo dir (`DIR/runs/*`), or one run dir (with summary.json);
cells and runs are treated the same. Writes `DIR/report.md` (plots as PNG files under
`DIR/report_files/`) and a self-contained `DIR/report.html` (plots as base64 PNG, audio clips as
base64 WAV). Groups are all axes except the seed: for a grid the axes come from each cell's
cell.json; elsewhere they are the config keys whose values differ between runs (seed excluded).
Numbers are means over seeds with a 95% Student-t interval; with one seed a metric shows the
evaluation's own bootstrap CI, labelled as such. Anything missing is "n/a (reason)".
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import json
import math
import numbers
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from ablations.spec import atomic_write_text

# summary.json fields copied into a results row as they are
SUMMARY_FIELDS = (
    "backbone",
    "conditioning",
    "pattern",
    "params",
    "non_embedding_params",
    "target_params",
    "steps",
    "tokens",
    "flops",
    "flops_per_step",
    "val_loss",
    "best_val_loss",
    "train_time_s",
)
LOWER_IS_BETTER_PREFIXES = ("val_loss", "loss", "fd", "fad", "kl", "mmd")
HIGHER_IS_BETTER_PREFIXES = ("clap", "adherence", "accuracy", "probe_acc")


# ----------------------------------------------------------------------------- reading runs


def _json(path: Path) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _jsonl(path: Path) -> list[dict]:
    p = Path(path)
    if not p.is_file():
        return []
    out = []
    for line in p.read_text().splitlines():
        line = line.strip()
        if line:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut by a crash
    return out


def _yaml(path: Path) -> dict:
    try:
        d = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError):
        return {}
    return d if isinstance(d, dict) else {}


def find_runs(root: Path) -> list[Path]:
    """Run dirs under `root`: root itself when it is a run, else root/cells/* and root/runs/*."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a directory")
    if (root / "summary.json").is_file():
        return [root]
    runs = []
    for sub in ("cells", "runs"):
        d = root / sub
        if d.is_dir():
            runs += sorted(p for p in d.iterdir() if p.is_dir())
    return runs


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(_flatten(v, key + "."))
        else:
            out[key] = json.dumps(v, sort_keys=True) if isinstance(v, (list, dict)) else v
    return out


def _num(v: Any) -> float | None:
    """A finite number as float (numpy scalars included), else None."""
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, numbers.Real):
        return None
    return float(v) if math.isfinite(float(v)) else None


def _last_line(text: str) -> str:
    lines = [x for x in text.strip().splitlines() if x.strip()]
    return lines[-1].strip()[:300] if lines else "unknown error"


def run_row(
    run_dir: Path, root: Path, cell: dict | None = None, failed: dict | None = None
) -> dict[str, Any]:
    """One flat results row for a run dir (which may not exist yet)."""
    run_dir = Path(run_dir)
    cell = cell or _json(run_dir / "cell.json") or {}
    row: dict[str, Any] = {
        "run": run_dir.name,
        "run_dir": str(run_dir.relative_to(root)) if run_dir != root else ".",
    }
    summary = _json(run_dir / "summary.json") if (run_dir / "summary.json").is_file() else None
    config = _yaml(run_dir / "config.yaml") or _yaml(run_dir / "cell.yaml") or cell.get("config") or {}
    row["seed"] = cell.get("seed", config.get("seed"))
    row["group"] = cell.get("group")
    for a, v in (cell.get("axes") or {}).items():
        row[f"axis.{a}"] = v
    for k, v in (cell.get("params") or {}).items():
        row[f"search.{k}"] = v
    err = None
    if (run_dir / "cell_error.txt").is_file():
        err = _last_line((run_dir / "cell_error.txt").read_text())
    if failed and run_dir.name in failed and failed[run_dir.name] not in ("waiting", "running", "failed"):
        err = _last_line(str(failed[run_dir.name]))
    run_status = summary.get("status") if isinstance(summary, dict) else None
    if isinstance(run_status, str) and run_status != "ok":  # e.g. diverged: ended for good, no metrics
        row["status"] = run_status
        err = str(summary.get("message") or run_status)
    elif isinstance(summary, dict) and isinstance(summary.get("metrics"), dict):
        row["status"] = "complete"
    elif isinstance(summary, dict):
        row["status"] = "failed" if err else "not evaluated"
    else:
        row["status"] = "failed" if err else ("not run" if not run_dir.exists() else "incomplete")
    row["error"] = err
    if isinstance(summary, dict):
        row["run_status"] = summary.get("status")
        for k in SUMMARY_FIELDS:
            row[k] = summary.get(k)
        b = summary.get("budget") or {}
        if isinstance(b, dict):
            for k in ("kind", "limit", "used", "binding"):
                row[f"budget.{k}"] = b.get(k)
        for name, m in (summary.get("metrics") or {}).items():
            m = m if isinstance(m, dict) else {"value": m}
            v = _num(m.get("value"))
            row[f"metric.{name}"] = v
            for k in ("ci_low", "ci_high", "n", "resolvable_difference"):
                if _num(m.get(k)) is not None:
                    row[f"metric.{name}.{k}"] = _num(m.get(k))
            for fk, fv in (m.get("floors") or {}).items():
                fv = fv.get("value") if isinstance(fv, dict) else fv
                if _num(fv) is not None:
                    row[f"metric.{name}.floor.{fk}"] = _num(fv)
            if v is None:
                row[f"metric.{name}.reason"] = str(
                    m.get("reason") or m.get("error") or f"value is {m.get('value')!r}"
                )
            if isinstance(m.get("direction"), str):
                row[f"metric.{name}.direction"] = m["direction"]
            elif isinstance(m.get("higher_is_better"), bool):
                row[f"metric.{name}.direction"] = "higher" if m["higher_is_better"] else "lower"
    row["_config"] = config
    return row


def collect(root: Path) -> pd.DataFrame:
    """All runs under `root` as a DataFrame (one row per run; `axis.*` columns define the groups)."""
    root = Path(root)
    manifest = _json(root / "grid.json") if (root / "grid.json").is_file() else None
    failed = (manifest or {}).get("failed") or {}
    rows = []
    if manifest and manifest.get("cells"):
        for c in manifest["cells"]:
            c = c if isinstance(c, dict) else {"name": c}
            d = root / "cells" / c["name"]
            rows.append(run_row(d, root, (_json(d / "cell.json") or c), failed))
    else:
        runs = find_runs(root)
        if not runs:
            raise FileNotFoundError(f"{root}: no runs found (looked for summary.json, cells/*, runs/*)")
        rows = [run_row(d, root, None, failed) for d in runs]
    df = pd.DataFrame(rows)
    if not any(c.startswith("axis.") for c in df.columns):
        _infer_axes(df)
    configs = df.pop("_config")
    del configs
    axes = axis_columns(df)
    df["label"] = [(" / ".join(str(r[a]) for a in axes) if axes else r["run"]) for _, r in df.iterrows()]
    df["group"] = [
        g if isinstance(g, str) and g else ("|".join(f"{a[5:]}={r[a]}" for a in axes) or "all")
        for g, (_, r) in zip(df["group"], df.iterrows())
    ]
    if "backbone" in df:
        cond = df["conditioning"] if "conditioning" in df else pd.Series([None] * len(df))
        df["family"] = [
            (f"{c} {b}" if isinstance(c, str) else str(b)) if isinstance(b, str) else None
            for b, c in zip(df["backbone"], cond)
        ]
    else:
        df["family"] = None
    return df


def _infer_axes(df: pd.DataFrame) -> None:
    """Runs that are not grid cells: the config keys that differ between runs (but the seed) are the axes."""
    flats = [_flatten(c) if isinstance(c, dict) else {} for c in df["_config"]]
    if len(flats) < 2:
        return
    keys = sorted(set().union(*flats))
    for k in keys:
        if k in ("seed", "name"):
            continue
        vals = [f.get(k) for f in flats]
        if len({json.dumps(v, sort_keys=True, default=str) for v in vals}) > 1:
            df[f"axis.{k}"] = [
                "" if v is None else (f"{v:g}" if isinstance(v, float) else str(v)) for v in vals
            ]


def axis_columns(df: pd.DataFrame) -> list[str]:
    return [c for c in df.columns if c.startswith("axis.")]


def metric_names(df: pd.DataFrame) -> list[str]:
    return sorted({c.split(".")[1] for c in df.columns if c.startswith("metric.") and c.count(".") == 1})


def write_results(root: Path) -> tuple[Path, Path]:
    """`results.csv` and `results.jsonl`: one flat row per cell/run, loadable with pandas."""
    root = Path(root)
    df = collect(root)
    csv_path, jsonl_path = root / "results.csv", root / "results.jsonl"
    atomic_write_text(csv_path, df.to_csv(index=False))
    recs = [
        {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()}
        for r in df.to_dict(orient="records")
    ]
    atomic_write_text(jsonl_path, "".join(json.dumps(r, default=str) + "\n" for r in recs))
    return csv_path, jsonl_path


# ----------------------------------------------------------------------------- statistics


def mean_ci(values) -> tuple[float, float, float, int] | None:
    """Mean and 95% Student-t interval over seeds; (mean, nan, nan, 1) for one value; None for none."""
    v = np.asarray([x for x in values if _num(x) is not None], float)  # finite numbers only
    n = len(v)
    if n == 0:
        return None
    m = float(v.mean())
    if n == 1:
        return m, math.nan, math.nan, 1
    from scipy import stats

    half = float(stats.t.ppf(0.975, n - 1) * v.std(ddof=1) / math.sqrt(n))
    return m, m - half, m + half, n


def fmt(x: float | None, kind: str = "num") -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    if kind == "count":
        for unit, s in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
            if abs(x) >= 0.9995 * unit:  # 999,793 reads "1.00M", not "1e+03k"
                return f"{x / unit:.3g}{s}" if abs(x) >= unit else f"{x / unit:.2f}{s}"
        return f"{x:.0f}"
    if kind == "sci":
        return f"{x:.3g}"
    return f"{x:.4g}"


def _reason(g: pd.DataFrame, col: str) -> str:
    """Why a group has no value for `col`."""
    done = _source(g, col)
    if done.empty:  # e.g. "n/a (failed)", "n/a (not run)"; the errors are listed under "Runs not complete"
        return "n/a (" + ", ".join(sorted(set(g["status"]))) + ")"
    rcol = f"{col}.reason"
    if rcol in g:
        reasons = [r for r in done[rcol].dropna()]
        if reasons:
            return f"n/a ({reasons[0]})"
    if col.startswith("metric."):
        return "n/a (not in this run's evaluation)"
    return f"n/a ({col} not recorded)"


def _source(g: pd.DataFrame, col: str) -> pd.DataFrame:
    """Rows that count for `col`: evaluated runs for metrics; runs whose training ended "ok" otherwise
    (a run that trained but failed in evaluation still has its params, FLOPs and val loss)."""
    if col.startswith("metric."):
        return g[g["status"] == "complete"]
    return g[g["run_status"] == "ok"] if "run_status" in g else g.iloc[:0]


def _cell(g: pd.DataFrame, col: str, kind: str = "num", ci: bool = True) -> str:
    done = _source(g, col)
    if col not in g or done[col].dropna().empty:
        return _reason(g, col)
    mc = mean_ci(done[col].tolist())
    m, lo, hi, n = mc
    if not ci:
        return fmt(m, kind)
    if n >= 2:
        return f"{fmt(m, kind)} [{fmt(lo, kind)}, {fmt(hi, kind)}]"
    lo_c, hi_c = f"{col}.ci_low", f"{col}.ci_high"
    if lo_c in done and hi_c in done and not done[lo_c].dropna().empty:
        lo1, hi1 = done[lo_c].dropna().iloc[0], done[hi_c].dropna().iloc[0]
        return f"{fmt(m, kind)} [{fmt(lo1, kind)}, {fmt(hi1, kind)}] (eval CI, 1 seed)"
    return f"{fmt(m, kind)} (1 seed)"


def _floor(g: pd.DataFrame, metric: str, kind: str = "noise") -> float | None:
    col = f"metric.{metric}.floor.{kind}"
    if col not in g or g[col].dropna().empty:
        return None
    return float(g[col].dropna().mean())


def group_table(df: pd.DataFrame) -> tuple[list[str], list[list[str]]]:
    """The comparison table: one row per group (all axes but the seed)."""
    axes = axis_columns(df)
    metrics = metric_names(df)
    headers = [a[5:] for a in axes] or ["run"]
    headers += ["seeds done", "params", "FLOPs", "steps", "binding budget", "train time (s)", "val loss"]
    for m in metrics:
        headers += [m, f"{m} noise floor", f"{m} resolvable diff"]
    rows = []
    for _, g in df.groupby("group", sort=False):
        first = g.iloc[0]
        r = [str(first[a]) for a in axes] if axes else [str(first["run"])]
        r.append(f"{int((g['status'] == 'complete').sum())}/{len(g)}")
        r.append(_cell(g, "params", "count", ci=False))
        r.append(_cell(g, "flops", "sci", ci=False))
        r.append(_cell(g, "steps", "count", ci=False))
        r.append(_budget(g))
        r.append(_cell(g, "train_time_s", ci=False))
        r.append(_cell(g, "val_loss"))
        for m in metrics:
            r.append(_cell(g, f"metric.{m}"))
            fl = _floor(g, m)
            r.append(
                fmt(fl)
                if fl is not None
                else _reason(g, f"metric.{m}.floor")
                if (g["status"] != "complete").all()
                else "n/a (no floor reported)"
            )
            r.append(_cell(g, f"metric.{m}.resolvable_difference", ci=False))  # eval: smallest resolvable diff
        rows.append(r)
    return headers, rows


def unequal_n(df: pd.DataFrame) -> dict[str, list[int]]:
    """Metrics whose evaluation n (clips scored) differs between runs: {metric: sorted distinct n}."""
    out = {}
    for m in metric_names(df):
        col = f"metric.{m}.n"
        ns = sorted({int(v) for v in df[col].dropna()}) if col in df else []
        if len(ns) > 1:
            out[m] = ns
    return out


def _budget(g: pd.DataFrame) -> str:
    if "budget.binding" not in g or g["budget.binding"].dropna().empty:
        return _reason(g, "budget") if (g["status"] != "complete").all() else "n/a (no budget recorded)"
    parts = []
    for _, r in g.dropna(subset=["budget.binding"]).drop_duplicates("budget.binding").iterrows():
        used, lim = _num(r.get("budget.used")), _num(r.get("budget.limit"))
        kind = r.get("budget.kind")
        s = str(r["budget.binding"])
        if used is not None and lim is not None:
            s += f" ({fmt(used, 'sci')}/{fmt(lim, 'sci')} {kind})"
        parts.append(s)
    return "; ".join(parts)


# ----------------------------------------------------------------------------- curves and audio


def curves(df: pd.DataFrame, root: Path) -> pd.DataFrame:
    """Validation rows of every run's log.jsonl: step, flops, val_loss, label, family, seed."""
    out = []
    for _, r in df.iterrows():
        for row in _jsonl(Path(root) / r["run_dir"] / "log.jsonl"):
            if _num(row.get("val_loss")) is None:
                continue
            out.append(
                {
                    "step": row.get("step"),
                    "flops": _num(row.get("flops")),
                    "val_loss": row["val_loss"],
                    "label": r["label"],
                    "family": r.get("family"),
                    "seed": r.get("seed"),
                }
            )
    return pd.DataFrame(out, columns=["step", "flops", "val_loss", "label", "family", "seed"])


@dataclass
class Clip:
    caption: str
    label: str
    path: Path
    wav_b64: str = ""
    seconds: float = 0.0


@dataclass
class Listening:
    captions: list[str] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)
    clips: dict[tuple[str, str], Clip] = field(default_factory=dict)
    note: str = ""


def _clip_b64(path: Path, seconds: float, max_sr: int) -> tuple[str, float]:
    """A short mono 16-bit WAV of the start of `path`, base64 encoded."""
    import soundfile as sf

    try:
        data, sr = sf.read(str(path), dtype="float32", always_2d=True, frames=-1)  # [N, C]
    except Exception as e:
        raise ValueError(f"{path}: unreadable audio ({e})") from e
    wav = data[: int(seconds * sr)].mean(axis=1)  # [N] mono
    if sr > max_sr:
        from math import gcd

        from scipy.signal import resample_poly

        g = gcd(int(sr), int(max_sr))
        wav, sr = resample_poly(wav, max_sr // g, sr // g).astype(np.float32), max_sr
    buf = io.BytesIO()
    sf.write(buf, np.clip(wav, -1, 1), sr, subtype="PCM_16", format="WAV")
    return base64.b64encode(buf.getvalue()).decode(), len(wav) / sr


def listening(
    df: pd.DataFrame,
    root: Path,
    max_captions: int = 3,
    max_clips: int = 24,
    clip_seconds: float = 5.0,
    max_sr: int = 22050,
) -> Listening:
    """The same captions across groups: one clip per (caption, group) from the group's first seed."""
    per_label: dict[str, dict[str, Path]] = {}
    for _, r in df.sort_values("seed", na_position="last").iterrows():
        if r["label"] in per_label:
            continue
        sdir = Path(root) / r["run_dir"] / "samples"
        rows = _jsonl(sdir / "samples.jsonl")
        if not rows:
            continue
        clips: dict[str, Path] = {}
        for s in rows:
            cap, f = s.get("caption"), s.get("file")
            if isinstance(cap, str) and isinstance(f, str) and cap not in clips and (sdir / f).is_file():
                clips[cap] = sdir / f
        if clips:
            per_label[r["label"]] = clips
    lis = Listening()
    if not per_label:
        lis.note = "n/a (no run has samples/samples.jsonl with existing audio files)"
        return lis
    labels = list(per_label)
    if len(labels) > max_clips:
        lis.note = f"showing the first {max_clips} of {len(labels)} groups. "
        labels = labels[:max_clips]
    counts: dict[str, int] = {}
    for lab in labels:
        for cap in per_label[lab]:
            counts[cap] = counts.get(cap, 0) + 1
    order = list(dict.fromkeys(c for lab in labels for c in per_label[lab]))
    shared = [c for c in order if counts[c] == len(labels)]
    if not shared:
        lis.note += "no caption was generated by every group; showing the most shared ones. "
        shared = sorted(order, key=lambda c: -counts[c])
    n_cap = max(1, min(max_captions, max_clips // len(labels)))
    lis.captions, lis.labels = shared[:n_cap], labels
    for cap in lis.captions:
        for lab in labels:
            p = per_label[lab].get(cap)
            if p is None:
                continue
            b64, secs = _clip_b64(p, clip_seconds, max_sr)
            lis.clips[(cap, lab)] = Clip(cap, lab, p, b64, secs)
    lis.note += f"First {clip_seconds:g} s of each clip, mono, at most {max_sr} Hz."
    return lis


# ----------------------------------------------------------------------------- document


@dataclass
class Doc:
    title: str
    parts: list[tuple] = field(default_factory=list)

    def h(self, text: str) -> None:
        self.parts.append(("h", text))

    def p(self, text: str) -> None:
        self.parts.append(("p", text))

    def table(self, headers: list[str], rows: list[list[str]]) -> None:
        self.parts.append(("table", headers, rows))

    def img(self, name: str, png: bytes, alt: str) -> None:
        self.parts.append(("img", name, png, alt))

    def audio(self, lis: Listening) -> None:
        self.parts.append(("audio", lis))


def _md_cell(s: str) -> str:
    return str(s).replace("|", "\\|").replace("\n", " ")


def render_md(doc: Doc, root: Path, files_dir: Path) -> str:
    out = [f"# {doc.title}", ""]
    for part in doc.parts:
        kind = part[0]
        if kind == "h":
            out += [f"## {part[1]}", ""]
        elif kind == "p":
            out += [part[1], ""]
        elif kind == "table":
            _, headers, rows = part
            out.append("| " + " | ".join(_md_cell(h) for h in headers) + " |")
            out.append("|" + "---|" * len(headers))
            out += ["| " + " | ".join(_md_cell(c) for c in r) + " |" for r in rows]
            out.append("")
        elif kind == "img":
            _, name, png, alt = part
            (files_dir / name).write_bytes(png)
            out += [f"![{alt}]({files_dir.name}/{name})", ""]
        elif kind == "audio":
            lis: Listening = part[1]
            if lis.captions:
                out.append("| caption | " + " | ".join(_md_cell(lab) for lab in lis.labels) + " |")
                out.append("|" + "---|" * (len(lis.labels) + 1))
                for cap in lis.captions:
                    cells = []
                    for lab in lis.labels:
                        c = lis.clips.get((cap, lab))
                        cells.append(f"[wav]({c.path.relative_to(root)})" if c else "n/a (not generated)")
                    out.append(f"| {_md_cell(cap)} | " + " | ".join(cells) + " |")
                out.append("")
            if lis.note:
                out += [lis.note, ""]
    return "\n".join(out)


_CSS = """
body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1200px;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:0.9em}
th,td{border:1px solid #ccc;padding:4px 8px;text-align:left;vertical-align:top}
th{background:#f0f0f0} img{max-width:100%;display:block;margin:1em 0} audio{width:220px}
.na{color:#999}
"""


def _html_cell(s: str) -> str:
    e = html.escape(str(s))
    return f'<span class="na">{e}</span>' if str(s).startswith("n/a") else e


def render_html(doc: Doc) -> str:
    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(doc.title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{html.escape(doc.title)}</h1>",
    ]
    for part in doc.parts:
        kind = part[0]
        if kind == "h":
            out.append(f"<h2>{html.escape(part[1])}</h2>")
        elif kind == "p":
            out.append(f"<p>{html.escape(part[1])}</p>")
        elif kind == "table":
            _, headers, rows = part
            out.append(
                "<table><thead><tr>"
                + "".join(f"<th>{html.escape(h)}</th>" for h in headers)
                + "</tr></thead><tbody>"
            )
            out += ["<tr>" + "".join(f"<td>{_html_cell(c)}</td>" for c in r) + "</tr>" for r in rows]
            out.append("</tbody></table>")
        elif kind == "img":
            _, _name, png, alt = part
            out.append(
                f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'
            )
        elif kind == "audio":
            lis: Listening = part[1]
            if lis.captions:
                out.append(
                    "<table><thead><tr><th>caption</th>"
                    + "".join(f"<th>{html.escape(lab)}</th>" for lab in lis.labels)
                    + "</tr></thead><tbody>"
                )
                for cap in lis.captions:
                    cells = []
                    for lab in lis.labels:
                        c = lis.clips.get((cap, lab))
                        cells.append(
                            f'<audio controls preload="metadata" title="{html.escape(lab)}" '
                            f'src="data:audio/wav;base64,{c.wav_b64}"></audio>'
                            if c
                            else '<span class="na">n/a (not generated)</span>'
                        )
                    out.append(
                        f"<tr><td>{html.escape(cap)}</td>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>"
                    )
                out.append("</tbody></table>")
            if lis.note:
                out.append(f"<p>{html.escape(lis.note)}</p>")
    out.append("</body></html>")
    return "\n".join(out)


# ----------------------------------------------------------------------------- the report


def _direction_note(metrics: list[str]) -> str:
    parts = []
    for m in metrics:
        if m.startswith(HIGHER_IS_BETTER_PREFIXES):
            parts.append(f"{m}: higher is better")
        elif m.startswith(LOWER_IS_BETTER_PREFIXES):
            parts.append(f"{m}: lower is better")
    return "; ".join(parts)


def build_report(root: Path, clip_seconds: float = 5.0, max_captions: int = 3, max_clips: int = 24) -> Path:
    """Write `root/report.md` (+ `root/report_files/*.png`) and a self-contained `root/report.html`."""
    from reports import plots

    root = Path(root)
    df = collect(root)
    manifest = _json(root / "grid.json") if (root / "grid.json").is_file() else {}
    title = f"Comparison report: {manifest.get('name') or root.name}"
    doc = Doc(title)
    status = df["status"].value_counts().to_dict()
    doc.p(
        f"Source: {root}. {len(df)} run(s): "
        + ", ".join(f"{v} {k}" for k, v in status.items())
        + "."
        + (
            f" Grid mode: {manifest.get('mode')}, preset: {manifest.get('preset') or 'none'}."
            if manifest
            else ""
        )
    )

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

    best = _json(root / "search_best.json") if (root / "search_best.json").is_file() else None
    if best:
        doc.h("Search: best config per group")
        doc.table(
            ["group", "metric", "best value", "params", "trials complete", "run"],
            [
                [
                    g,
                    f"{b['metric']} ({b['direction']})",
                    fmt(_num(b.get("value")))
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
        png = plots.metric_bars(done, f"metric.{m}", m, _floor(df, m))
        if png:
            doc.img(f"metric_{m}.png", png, f"{m} per group")
        else:
            doc.p(f"{m}: n/a (no complete run has a value)")

    series = [("val_loss", "val loss", None)] + [(f"metric.{m}", m, _floor(df, m)) for m in metrics]
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

    doc.h("Listening: the same captions across groups")
    doc.audio(listening(df, root, max_captions=max_captions, max_clips=max_clips, clip_seconds=clip_seconds))

    files_dir = root / "report_files"
    files_dir.mkdir(exist_ok=True)
    atomic_write_text(root / "report.md", render_md(doc, root, files_dir))
    out = root / "report.html"
    atomic_write_text(out, render_html(doc))
    return out


def cli(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(
        prog="ttm-bench report",
        description="Build report.md and a self-contained report.html for a grid or demo dir.",
    )
    ap.add_argument("dir", help="grid dir (cells/*), demo dir (runs/*) or one run dir")
    ap.add_argument("--clip-seconds", type=float, default=5.0, help="seconds of audio per embedded clip")
    ap.add_argument("--max-captions", type=int, default=3, help="captions in the listening table")
    ap.add_argument("--max-clips", type=int, default=24, help="embedded clips at most")
    ap.add_argument("--no-results", action="store_true", help="do not (re)write results.csv/jsonl")
    a = ap.parse_args(argv)
    root = Path(a.dir)
    if not a.no_results and not (root / "summary.json").is_file():
        write_results(root)
    out = build_report(root, a.clip_seconds, a.max_captions, a.max_clips)
    print(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB) and {root / 'report.md'}")
    return 0
