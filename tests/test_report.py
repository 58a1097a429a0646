"""The comparison report: tables with CIs over seeds, plots, audio players, headless Chromium render."""

from __future__ import annotations

import base64
import io
import math
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import yaml
from test_grid import fake_cell

from ablations import runner
from reports.build import build_report
from reports.results import collect
from reports.tables import diff_ci, fmt, mean_ci

CAPTIONS = ["a calm piano piece", "fast drums"]


@pytest.fixture(scope="module")
def grid(tmp_path_factory) -> Path:
    """A FAKE grid: backbone x size (steps and d_model), 2 seeds; the mamba cells crash (left failed)."""
    d = tmp_path_factory.mktemp("report")
    spec = d / "s.yaml"
    spec.write_text(
        yaml.safe_dump(
            {
                "name": "rep",
                "base": {"fake": {"crash_backbone": "mamba"}},
                "axes": {
                    "model.backbone": ["transformer", "simba", "mamba"],
                    "size": [
                        {"label": "small", "train.steps": 20, "model.d_model": 16},
                        {"label": "large", "train.steps": 40, "model.d_model": 32},
                    ],
                },
                "seeds": [0, 1],
            },
            sort_keys=False,
        )
    )
    return runner.run_grid(spec, d / "g", cell_fn=fake_cell, progress=False)


def _table(md: str) -> tuple[list[str], list[list[str]]]:
    """The first markdown table after '## Comparison'."""
    part = md.split("## Comparison", 1)[1]
    lines = [ln for ln in part.splitlines() if ln.startswith("|")]
    rows = []
    for ln in lines:
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", ln)[1:-1]]
        if set("".join(cells)) <= set("-"):
            continue
        if rows and len(cells) != len(rows[0]):
            break
        rows.append(cells)
    return rows[0], rows[1:]


@pytest.mark.parametrize("sd_b", [1.0, 3.0])
def test_seed_intervals_cover_the_true_value(sd_b):
    """Coverage on synthetic seeds with a known truth (3 seeds per arm, as the shipped grids):
    the mean's t-interval and Welch's interval of a difference each hold the truth ~95% of the time."""
    rng = np.random.default_rng(0)
    reps, hit_mean, hit_diff = 4000, 0, 0
    for _ in range(reps):
        a = rng.normal(1.0, 1.0, 3)
        b = rng.normal(0.2, sd_b, 3)
        _, lo, hi, _ = mean_ci(a)
        hit_mean += lo <= 1.0 <= hi
        _, dlo, dhi = diff_ci(a, b)
        hit_diff += dlo <= 0.8 <= dhi
    assert 0.93 <= hit_mean / reps <= 0.97, hit_mean / reps
    assert 0.93 <= hit_diff / reps <= 0.975, hit_diff / reps  # Welch is slightly conservative at n = 3
    assert diff_ci([1.0], [0.0, 1.0]) is None  # one seed: no interval


def test_mean_ci_closed_form():
    from scipy import stats

    v = [1.0, 2.0, 4.0]
    m, lo, hi, n = mean_ci(v)
    half = stats.t.ppf(0.975, 2) * np.std(v, ddof=1) / math.sqrt(3)
    assert (
        (m, n) == (pytest.approx(7 / 3), 3)
        and lo == pytest.approx(m - half)
        and hi == pytest.approx(m + half)
    )
    m, lo, hi, n = mean_ci([5.0, float("nan"), None])
    assert m == 5.0 and n == 1 and math.isnan(lo)
    assert mean_ci([]) is None
    assert fmt(None) == "n/a" and fmt(1.5e6, "count") == "1.50M" and fmt(1_000_564, "count") == fmt(999_793, "count") == "1.00M"


def test_comparison_table(grid):
    md = (grid / "report.md").read_text()
    headers, rows = _table(md)
    assert headers[:2] == ["model.backbone", "size"]
    for h in (
        "seeds done",
        "params",
        "FLOPs",
        "binding budget",
        "val loss",
        "fd_probe",
        "fd_probe noise floor",
        "adherence",
        "clap",
    ):
        assert h in headers, h
    assert len(rows) == 3 * 2
    col = {h: i for i, h in enumerate(headers)}
    by = {(r[0], r[1]): r for r in rows}
    r = by[("transformer", "large")]
    assert r[col["seeds done"]] == "2/2"
    # FAKE fd_probe = 10 q + 5 with q = 0.01 seed - 0.001 d_model: mean and t-interval over seeds 0, 1
    vals = [10 * (0.01 * s - 0.032) + 5 for s in (0, 1)]
    m, lo, hi, _ = mean_ci(vals)
    assert r[col["fd_probe"]] == f"{fmt(m)} [{fmt(lo)}, {fmt(hi)}]"
    assert r[col["fd_probe noise floor"]] == "4.5"
    assert r[col["clap"]] == "n/a (FAKE: CLAP weights not available)"
    m, lo, hi, _ = mean_ci([0.5 - (0.01 * s - 0.032) for s in (0, 1)])  # FAKE info gain 0.5 - q
    assert r[col["text info gain (nats/token)"]] == f"{fmt(m)} [{fmt(lo)}, {fmt(hi)}]"
    assert r[col["binding budget"]].startswith("steps (40/40 steps)")
    assert r[col["params"]] == fmt(1000 * 32 + 500, "count")
    # the crashed cells have no numbers, only the reason
    bad = by[("mamba", "small")]
    assert bad[col["seeds done"]] == "0/2"
    assert bad[col["val loss"]] == bad[col["fd_probe"]] == bad[col["binding budget"]] == "n/a (failed)"
    assert "## Runs not complete" in md and "RuntimeError: FAKE crash in the cell function" in md


def test_plots_written_and_embedded(grid):
    md = (grid / "report.md").read_text()
    pngs = re.findall(r"!\[[^\]]*\]\(report_files/([^)]+)\)", md)
    for name in (
        "val_loss_vs_step.png",
        "val_loss_vs_flops.png",
        "metric_fd_probe.png",
        "fd_probe_vs_steps.png",
        "fd_probe_vs_params.png",
        "val_loss_vs_params.png",
    ):
        assert name in pngs, name
    import matplotlib.image as mpimg

    for name in pngs:
        img = mpimg.imread(grid / "report_files" / name)
        assert img.shape[0] > 100 and img.shape[1] > 100
    page = (grid / "report.html").read_text()
    assert page.count('src="data:image/png;base64,') == len(pngs)
    assert "report_files/" not in page  # self-contained
    assert (grid / "report.html").stat().st_size < 5e6


def _dominant_hz(wav: np.ndarray, sr: int) -> float:
    spec = np.abs(np.fft.rfft(wav))
    return float(np.fft.rfftfreq(len(wav), 1 / sr)[spec.argmax()])


def test_audio_players_match_captions_across_backbones(grid):
    page = (grid / "report.html").read_text()
    listen = page.split("Listening: the same captions across groups", 1)[1]
    rows = re.findall(r"<tr><td>(.*?)</td>(.*?)</tr>", listen, flags=re.DOTALL)
    assert [r[0] for r in rows] == CAPTIONS
    heads = re.findall(r"<th>(.*?)</th>", listen.split("</thead>")[0])[1:]
    assert len(heads) == 4 and all(" / " in h for h in heads)  # the 4 groups that produced samples
    for i, (cap, cells) in enumerate(rows):
        uris = re.findall(r'src="data:audio/wav;base64,([^"]+)"', cells)
        assert len(uris) == len(heads)
        for head, b64 in zip(heads, uris):
            wav, sr = sf.read(io.BytesIO(base64.b64decode(b64)))
            assert sr == 8000 and len(wav) == 4000
            # the FAKE renders caption i at 220 (1 + i) Hz, x1.5 for simba: the clip belongs to this caption
            want = 220.0 * (1 + i) * (1.5 if head.startswith("simba") else 1.0)
            assert abs(_dominant_hz(wav, sr) - want) < 5


def test_results_files_load_with_pandas(grid):
    import pandas as pd

    df = pd.read_csv(grid / "results.csv")
    assert len(df) == 12
    assert (df["status"] == "complete").sum() == 8 and (df["status"] == "failed").sum() == 4
    assert df.loc[df["status"] == "failed", "error"].str.contains("FAKE crash").all()
    j = pd.read_json(grid / "results.jsonl", lines=True)
    assert list(j["run"]) == list(df["run"])


def test_demo_dir_with_runs_and_single_run(tmp_path):
    root = tmp_path / "demo"
    for bb in ("transformer", "simba"):
        d = root / "runs" / bb
        d.mkdir(parents=True)
        fake_cell({"seed": 0, "model": {"backbone": bb, "d_model": 32}, "train": {"steps": 40}}, d)
    df = collect(root)
    assert list(df["axis.model.backbone"]) == ["simba", "transformer"]  # inferred: the key that differs
    out = build_report(root)
    md = (root / "report.md").read_text()
    headers, rows = _table(md)
    assert headers[0] == "model.backbone" and {r[0] for r in rows} == {"simba", "transformer"}
    assert "val loss" in headers and all(r[headers.index("val loss")].endswith("(1 seed)") for r in rows)
    # one seed: the metric shows the evaluation's own CI, labelled
    assert all(r[headers.index("fd_probe")].endswith("(eval CI, 1 seed)") for r in rows)
    # the information gain with one seed: its interval over validation clips
    assert all(r[headers.index("text info gain (nats/token)")].endswith("(clip CI, 1 seed)") for r in rows)
    assert out.read_text().count("<audio ") == 4
    single = build_report(root / "runs" / "simba")
    assert single.exists() and "n/a (" in (root / "runs" / "simba" / "report.md").read_text()


def test_report_cli_errors(tmp_path):
    from reports.build import cli

    with pytest.raises(FileNotFoundError, match="no runs found"):
        cli([str(tmp_path)])
    with pytest.raises(FileNotFoundError, match="not a directory"):
        cli([str(tmp_path / "nope")])


# ----------------------------------------------------------------------------- headless Chromium

CHECK_JS = """
<script>
function wavOk(src) {  // the data URI is a complete RIFF/WAVE file with a format and a non-empty data chunk
  try {
    const s = atob(src.split(',')[1]);
    const u32 = o => (s.charCodeAt(o) | s.charCodeAt(o + 1) << 8 | s.charCodeAt(o + 2) << 16 |
                      s.charCodeAt(o + 3) << 24) >>> 0;
    if (s.slice(0, 4) !== 'RIFF' || s.slice(8, 12) !== 'WAVE' || u32(4) + 8 !== s.length) return false;
    let o = 12, rate = 0, data = 0;
    while (o + 8 <= s.length) {
      const id = s.slice(o, o + 4), n = u32(o + 4);
      if (id === 'fmt ') rate = u32(o + 12);
      if (id === 'data') data = n;
      o += 8 + n + (n & 1);
    }
    return rate > 0 && data > 0;
  } catch (e) { return false; }
}
window.addEventListener('load', async () => {
  const imgs = [...document.images];
  const imgOk = imgs.filter(i => i.complete && i.naturalWidth > 0).length;
  const auds = [...document.querySelectorAll('audio')];
  const d = document.createElement('div');
  d.id = 'check';
  d.textContent = `CHECK imgs=${imgs.length} imgok=${imgOk} audio=${auds.length} ` +
                  `wavok=${auds.filter(a => wavOk(a.src)).length} END`;
  document.body.appendChild(d);
  // the browser's own decoder (asynchronous: may finish after the DOM is dumped, then the test retries)
  const ctx = new OfflineAudioContext(1, 16000, 16000);
  const decoded = await Promise.all(auds.map(async a => {
    try {
      const buf = await (await fetch(a.src)).arrayBuffer();
      return (await ctx.decodeAudioData(buf)).duration > 0;
    } catch (e) { return false; }
  }));
  const e = document.createElement('div');
  e.textContent = `DECODED ${decoded.filter(x => x).length} END`;
  document.body.appendChild(e);
});
</script>
"""


def _chromium() -> str:
    exe = shutil.which("chromium") or ("/usr/bin/chromium" if os.path.exists("/usr/bin/chromium") else None)
    if exe:
        return exe
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.skip(
            "chromium is not installed and this test cannot install it (needs root and apt-get): "
            "apt-get install -y chromium"
        )
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    try:
        subprocess.run(["apt-get", "update", "-qq"], env=env, check=False, capture_output=True, timeout=600)
        r = subprocess.run(
            ["apt-get", "install", "-y", "-qq", "chromium"],
            env=env,
            check=False,
            capture_output=True,
            text=True,
            timeout=900,
        )
    except subprocess.TimeoutExpired:
        pytest.skip("apt-get install chromium timed out (no network to the Debian mirror?)")
    if r.returncode != 0 or not os.path.exists("/usr/bin/chromium"):
        pytest.skip(f"apt-get install chromium failed: {r.stderr.strip()[-300:]}")
    return "/usr/bin/chromium"


@pytest.mark.slow
def test_report_renders_in_headless_chromium(grid, tmp_path):
    exe = _chromium()
    page = (grid / "report.html").read_text()
    probe = tmp_path / "probe.html"
    probe.write_text(page.replace("</body>", CHECK_JS + "</body>"))
    cmd = [
        exe,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--disable-dev-shm-usage",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--virtual-time-budget=20000",
        "--dump-dom",
        probe.as_uri(),
    ]
    decoded = None
    for _ in range(5):  # the synchronous checks always land; the async decode may miss the dump
        r = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=180)
        m = re.search(r"CHECK imgs=(\d+) imgok=(\d+) audio=(\d+) wavok=(\d+) END", r.stdout)
        assert m, f"no check result in the DOM; stderr: {r.stderr[-2000:]}"
        imgs, imgok, audio, wavok = map(int, m.groups())
        assert imgs == page.count("data:image/png;base64,") and imgs >= 5 and imgok == imgs
        assert audio == page.count("data:audio/wav;base64,") == 8 and wavok == audio
        d = re.search(r"DECODED (\d+) END", r.stdout)
        if d:
            decoded = int(d.group(1))
            break
    assert decoded == audio, f"Chromium decoded {decoded} of {audio} clips"
