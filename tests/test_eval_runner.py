"""eval.runner end to end on a synthetic set with tiny random models (`ttm-bench eval`)."""

import csv
import json
import math
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

sys.path.insert(0, str(Path(__file__).parent))
from test_eval_embedders import make_set, synth_clip, tiny_ast, tiny_clap, tiny_encodec

from eval.runner import cli, evaluate
from ttm.audio import save_audio

ALL = "fd_probe,adherence,kl_ast,kl_ast_sam,clap,fad_clap,fad_encodec"


class MuLawCodec:
    """8-bit mu-law at 16 kHz: a real (if simple) codec for the codec floor."""

    sample_rate, channels = 16000, 1

    def identity(self):
        return {"codec": "mulaw", "bits": 8, "sample_rate": self.sample_rate}

    def encode(self, wav):  # [B, C, N] -> [B, 1, N]
        x = wav.mean(1, keepdim=True).clamp(-1, 1)
        y = torch.sign(x) * torch.log1p(255 * x.abs()) / math.log(256)
        return ((y + 1) / 2 * 255).round().long()

    def decode(self, codes):  # [B, 1, N] -> [B, 1, N]
        y = codes.float() / 255 * 2 - 1
        return torch.sign(y) * (256 ** y.abs() - 1) / 255


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    manifest = make_set(root / "set")
    gen = root / "gen"
    gen.mkdir()
    lines = []
    for e in (json.loads(x) for x in manifest.read_text().splitlines()):
        if e["split"] != "test":
            continue
        a = e["attributes"]  # re-rendered at another pitch, phase and rate (22.05 kHz -> resampled)
        save_audio(gen / f"{e['id']}.wav", synth_clip(a["family"], a["tempo"], 770, sr=22050, seed=99), 22050)
        lines.append({"file": f"{e['id']}.wav", "caption": e["caption"], "seed": 1, "attributes": a, "ref_id": e["id"]})
    (gen / "samples.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    ckpts = {"clap": tiny_clap(root / "clap"), "ast": tiny_ast(root / "ast"), "encodec": tiny_encodec(root / "encodec")}
    return {"root": root, "manifest": manifest, "gen": gen, "ckpts": {k: str(v) for k, v in ckpts.items()}}


@pytest.fixture(autouse=True)
def isolated(env, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("TTM_BENCH_CACHE", str(env["root"] / "cache"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(env["root"] / "empty-hf-cache"))
    monkeypatch.delenv("TTM_BENCH_VGGISH", raising=False)


def _ckpt_args(env):
    return [a for k, v in env["ckpts"].items() for a in ("--ckpt", f"{k}={v}")]


def test_eval_cli_end_to_end_writes_json_and_csv(env, capsys):
    out = env["root"] / "run" / "eval.json"
    argv = ["--generated", str(env["gen"]), "--reference", str(env["manifest"]), "--metrics", ALL,
            "--out", str(out), "--quiet", "--n-bootstrap", "100", *_ckpt_args(env)]
    assert cli(argv) == 0
    res = json.loads(out.read_text())
    assert set(res["metrics"]) == set(ALL.split(","))
    for name, m in res["metrics"].items():
        assert math.isfinite(m["value"]) and m["ci_low"] <= m["ci_high"], name
        sr = m["settings"]["sr"]  # generated: 22.05 kHz clips
        assert m["settings"]["resampled_from"]["generated"] == sorted({22050} - {sr}), name
        assert m["settings"]["resampled_from"]["reference"] == sorted({16000} - {sr}), name
        assert set(m["floors"]) == {"noise", "codec"} and m["floors"]["codec"] is None
    assert res["metrics"]["fad_clap"]["settings"]["sr"] == 48000
    fd = res["metrics"]["fd_probe"]
    assert fd["n"] == 6 and fd["n_reference"] == 6
    # 6 clips per set cannot support the probe's 96 dimensions: reduced to 3 by the train-split PCA
    assert fd["dim"] == 3 and fd["dimension_reduction"]["k"] == 3 and fd["dimension_reduction"]["dim_in"] == 96
    assert fd["ci_low"] <= fd["value"] <= fd["ci_high"] and fd["fd_at_n"]["value"] == fd["value"]
    assert fd["fd_population"]["ci_low"] <= fd["fd_population"]["ci_high"] and "FD AT THIS n" in fd["interval_meaning"]
    noise = res["metrics"]["fad_encodec"]["floors"]["noise"]
    assert noise["n_half_a"] == 3 and noise["n_generated_used"] == 3 and noise["value"] >= 0
    assert "more than 500" in res["metrics"]["fad_encodec"]["fd_inf"]["reason"]  # 6 clips x 75 frames
    for name in ("fd_probe", "adherence"):
        assert res["metrics"][name]["probe"]["heldout_accuracy"]["mean"] >= res["metrics"][name]["probe"]["required_accuracy"]
    adh = res["metrics"]["adherence"]
    assert set(adh["per_attribute"]) == {"family", "tempo"} and 0 <= adh["value"] <= 1
    assert res["metrics"]["kl_ast"]["direction"] == "KL(reference || generated)"
    assert res["metrics"]["kl_ast_sam"]["direction"] == "KL(generated || reference)"
    assert res["metrics"]["kl_ast"]["n_pairs"] == 6
    assert "passed for every generated and reference clip" in res["audio_checks"]
    rows = list(csv.DictReader(out.with_suffix(".csv").open()))
    assert len(rows) == 6
    assert {"file", "caption", "adherence", "adherence_family", "clap", "kl_ast", "kl_ast_sam"} <= set(rows[0])
    clap_mean = np.mean([float(r["clap"]) for r in rows])
    assert clap_mean == pytest.approx(res["metrics"]["clap"]["value"], abs=1e-5)
    assert "fd_probe" in capsys.readouterr().out

    # embeddings are cached on disk: a second run reads them back and gives the same numbers
    cached = list((env["root"] / "cache" / "embeddings").rglob("*.npz"))
    assert len(cached) >= 4 * (6 + 6)
    again = evaluate(env["gen"], env["manifest"], ALL.split(","), None, ckpts=env["ckpts"], n_bootstrap=100, progress=False)
    for name, m in again["metrics"].items():
        assert m["value"] == pytest.approx(res["metrics"][name]["value"], rel=1e-6, abs=1e-9), name
    assert len(list((env["root"] / "cache" / "embeddings").rglob("*.npz"))) == len(cached)


def test_codec_floor(env):
    res = evaluate(env["gen"], env["manifest"], ["fd_probe", "adherence", "kl_ast"], None, codec=MuLawCodec(),
                   ckpts=env["ckpts"], n_bootstrap=50, progress=False)
    assert res["codec"]["codec"] == "mulaw"
    fd = res["metrics"]["fd_probe"]["floors"]
    # an almost transparent codec: the resynthesised reference sits far closer to the reference
    # than one half of the reference to the other
    assert 0 <= fd["codec"]["value"] < fd["noise"]["value"]
    adh = res["metrics"]["adherence"]["floors"]
    assert abs(adh["codec"]["value"] - adh["noise"]["value"]) <= 0.2
    assert res["metrics"]["kl_ast"]["floors"]["codec"]["value"] < 0.01


def test_default_metrics_skip_unavailable_weights(env):
    res = evaluate(env["gen"], env["manifest"], None, None, ckpts={"clap": env["ckpts"]["clap"]}, n_bootstrap=20, progress=False)
    assert {"fd_probe", "adherence", "clap", "fad_clap"} <= set(res["metrics"])
    assert set(res["skipped"]) == {"kl_ast", "kl_ast_sam", "fad_encodec", "fd_vggish"}
    assert "not in the Hugging Face cache" in res["skipped"]["kl_ast"]
    assert "TTM_BENCH_VGGISH" in res["skipped"]["fd_vggish"]


def test_reference_folder_and_probe_path(env, tmp_path):
    ref = tmp_path / "ref"
    for p in (env["manifest"].parent / "audio").glob("*-5.wav"):
        save_audio(ref / p.name, sf.read(p, dtype="float32")[0], 16000)
    with pytest.raises(ValueError, match="probe metrics need a manifest"):
        evaluate(env["gen"], ref, ["fd_probe"], None, progress=False)
    probe = next((env["root"] / "cache" / "probes").glob("*.pt"), None)
    if probe is None:  # this test alone: train it through a manifest run first
        evaluate(env["gen"], env["manifest"], ["fd_probe"], None, n_bootstrap=10, progress=False)
        probe = next((env["root"] / "cache" / "probes").glob("*.pt"))
    # a folder has no train split to fit the PCA on: 6 clips in 96 dimensions are refused
    with pytest.raises(ValueError, match=r"needs at least 2 \* D = 192 per set.*at least 192 clips.*folder of audio"):
        evaluate(env["gen"], ref, ["fd_probe"], None, probe_path=probe, n_bootstrap=20, progress=False)
    res = evaluate(env["gen"], ref, ["adherence", "fad_encodec"], None, probe_path=probe, ckpts=env["ckpts"],
                   n_bootstrap=20, progress=False)
    assert res["reference"]["kind"] == "folder" and res["reference"]["n"] == 6
    assert res["metrics"]["fad_encodec"]["n_reference"] == 6
    with pytest.raises(ValueError, match="kl_ast: no generated clip names its reference clip"):
        evaluate(env["gen"], ref, ["kl_ast"], None, ckpts=env["ckpts"], progress=False)


def test_probe_floor_refuses_to_score(env):
    with pytest.raises(ValueError, match=r"mean held-out accuracy 0\.\d+ \(required 1\.000 = chance"):
        evaluate(env["gen"], env["manifest"], ["fd_probe"], None, probe_floor=1.0, progress=False)


def test_bad_input_errors(env, tmp_path):
    with pytest.raises(ValueError, match="unknown bogus"):
        evaluate(env["gen"], env["manifest"], ["bogus"], None, progress=False)
    with pytest.raises(FileNotFoundError, match="metric fd_vggish: vggish: no weights given"):
        evaluate(env["gen"], env["manifest"], ["fd_vggish"], None, progress=False)
    bad = tmp_path / "gen"
    bad.mkdir()
    (bad / "samples.jsonl").write_text(json.dumps({"file": "missing.wav", "caption": "x"}) + "\n")
    with pytest.raises(FileNotFoundError, match="missing.wav not found"):
        evaluate(bad, env["manifest"], ["fd_probe"], None, progress=False)
    with pytest.raises(ValueError, match="split: expected one of train, valid, test, got 'train2'"):
        evaluate(env["gen"], env["manifest"], ["fd_probe"], None, split="train2", progress=False)
    train_only = env["manifest"].parent / "train_only.jsonl"
    train_only.write_text("".join(x for x in env["manifest"].read_text().splitlines(True) if '"train"' in x))
    with pytest.raises(ValueError, match="no clips in split 'test'"):
        evaluate(env["gen"], train_only, ["fd_probe"], None, progress=False)
    with pytest.raises(ValueError, match="expected NAME=PATH"):
        cli(["--list", "--ckpt", "clap"])


def test_list_and_dispatch_through_ttm_bench(env, capsys):
    from ttm.cli import main

    assert main(["eval", "--list", "--ckpt", f"clap={env['ckpts']['clap']}"]) == 0
    out = capsys.readouterr().out
    for m in ALL.split(",") + ["fd_vggish"]:
        assert m in out
    assert "fd_vggish    embedder=vggish   NOT available" in out
    assert "clap         embedder=clap     available" in out
    assert main(["eval", "--generated", str(env["gen"]), "--reference", str(env["manifest"]), "--metrics", "bogus"]) == 2
    assert "ttm-bench eval: error: --metrics: unknown bogus" in capsys.readouterr().err


def test_samples_without_attributes_take_the_reference_ones(env, tmp_path):
    import shutil

    gen = tmp_path / "gen"
    gen.mkdir()
    lines = [json.loads(x) for x in (env["gen"] / "samples.jsonl").read_text().splitlines()][:6]
    for x in lines:
        shutil.copy(env["gen"] / x["file"], gen / x["file"])
    (gen / "samples.jsonl").write_text("".join(json.dumps({**x, "attributes": {}}) + "\n" for x in lines))
    res = evaluate(gen, env["manifest"], ["adherence"], None, n_bootstrap=20, progress=False)
    assert res["generated"]["n_attributes_from_reference"] == 6
    assert res["metrics"]["adherence"]["per_attribute"]["family"]["n"] == 6


@pytest.mark.parametrize("case,defect", [
    ("nan", r"non-finite samples \(1 NaN, 0 Inf\)"),
    ("inf", r"non-finite samples \(0 NaN, 1 Inf\)"),
    ("loud", r"samples out of range: peak 3 \(expected within \[-1, 1\]\)"),
    ("antiphase", r"silent after the down-mix to mono \(channel peak 0.5\)"),
    ("silent", r"silent: mono peak 0"),
    ("short", r"too short: 0.200 s \(at least 0.5 s\)"),
    ("empty", r"empty \(0 samples\)"),
])
def test_bad_audio_is_refused_naming_the_file_and_defect(env, tmp_path, case, defect):
    from eval.runner import audio_defect

    t = np.arange(16000) / 16000
    x = (0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    wav = {"nan": x.copy(), "inf": x.copy(), "loud": 6 * x, "antiphase": np.stack([x, -x], 1), "silent": 0 * x,
           "short": x[:3200], "empty": x[:0]}[case]
    if case == "nan":
        wav[100] = np.nan
    if case == "inf":
        wav[100] = np.inf
    gen = tmp_path / "gen"
    gen.mkdir()
    sf.write(gen / "ok.wav", x, 16000, subtype="FLOAT")
    sf.write(gen / f"{case}.wav", wav, 16000, subtype="FLOAT")
    assert audio_defect(gen / "ok.wav") == ""
    assert re.search(defect, audio_defect(gen / f"{case}.wav"))
    with pytest.raises(ValueError, match=rf"--generated .*: 1 of 2 clips cannot be scored:\n  .*{case}\.wav: {defect}"):
        evaluate(gen, env["manifest"], ["fd_probe"], None, progress=False)


def test_pairing_is_one_to_one_by_id_with_duplicate_captions(env, tmp_path):
    """Every reference clip gets the same caption: pairing by caption would be 6 x 6; by id it is
    1:1. A free-text sample (no ref_id) is not paired and is said so in eval.json."""
    lines = [json.loads(x) for x in env["manifest"].read_text().splitlines()]
    manifest = env["manifest"].parent / "same_caption.jsonl"
    manifest.write_text("".join(json.dumps({**x, "caption": "A tone."}) + "\n" for x in lines))
    gen = tmp_path / "gen"
    gen.mkdir()
    rows = [json.loads(x) for x in (env["gen"] / "samples.jsonl").read_text().splitlines()]
    for r in rows:
        (gen / r["file"]).write_bytes((env["gen"] / r["file"]).read_bytes())
    free = {**rows[0], "file": "free.wav", "caption": "A tone."}
    free.pop("ref_id")
    (gen / "free.wav").write_bytes((env["gen"] / rows[0]["file"]).read_bytes())
    (gen / "samples.jsonl").write_text("".join(json.dumps({**r, "caption": "A tone."}) + "\n" for r in rows + [free]))
    res = evaluate(gen, manifest, ["kl_ast"], tmp_path / "eval.json", ckpts=env["ckpts"], n_bootstrap=20, progress=False)
    kl = res["metrics"]["kl_ast"]
    assert kl["n_pairs"] == 6 and kl["n"] == 6 and kl["n_unpaired"] == 1
    assert res["pairing"]["n_paired"] == 6 and res["pairing"]["n_unpaired"] == 1
    # each pair is the generated clip with its own reference clip: the per-clip KL matches a 1:1 computation
    per = {r["file"]: r["kl_ast"] for r in csv.DictReader((tmp_path / "eval.csv").open())}
    assert per["free.wav"] == "" and all(per[r["file"]] != "" for r in rows)
    bad = dict(rows[0], ref_id="no-such-clip")
    (gen / "samples.jsonl").write_text(json.dumps(bad) + "\n")
    with pytest.raises(ValueError, match="ref_id 'no-such-clip' is not a clip of the reference set"):
        evaluate(gen, manifest, ["kl_ast"], None, ckpts=env["ckpts"], progress=False)
    (gen / "samples.jsonl").write_text(json.dumps(free) + "\n")
    with pytest.raises(ValueError, match="free-text prompts are scored only with unpaired metrics"):
        evaluate(gen, manifest, ["kl_ast"], None, ckpts=env["ckpts"], progress=False)


def test_offline_default_metric_set_is_fd_kl_clap_style_and_adherence(env):
    """No pretrained weights: every metric family still comes from the embedded evaluator."""
    res = evaluate(env["gen"], env["manifest"], None, None, n_bootstrap=50, progress=False)
    m = res["metrics"]
    assert {"fd_probe", "adherence", "kl_probe", "clap_probe"} <= set(m)
    kl, clap = m["kl_probe"], m["clap_probe"]
    assert kl["paired"] and kl["n_pairs"] == 6 and kl["value"] >= 0 and kl["reverse"]["value"] >= 0
    assert kl["direction"] == "KL(reference || generated)" and kl["reverse"]["direction"] == "KL(generated || reference)"
    assert kl["floors"]["noise"]["value"] is None  # the test split has no repeated caption
    assert -1 <= clap["value"] <= 1 and not clap["paired"] and clap["contrastive_head"]["recall"] > 0
    assert clap["floors"]["noise"]["value"] > 0  # reference clips with their own captions
    for name in ("fd_probe", "adherence", "kl_probe", "clap_probe"):
        assert m[name]["resolvable_difference"] > 0, name


def test_a_metric_is_one_registered_class(env):
    from eval.scores import Inputs, Metric, list_metrics, register
    from eval.scores.base import REGISTRY

    @register("mean_probe_norm")
    class MeanNorm(Metric):  # a new metric: one class, nothing else edited
        embedder = "probe"
        what = "mean norm of the probe embedding"

        def compute(self, x: Inputs):
            per = np.array([float(np.linalg.norm(f["emb"])) for f in x.gen_f])
            return {"value": float(per.mean()), "ci_low": None, "ci_high": None, "n": len(per)}

        def floors(self, x: Inputs):
            return {"noise": None, "codec": None}

    try:
        assert "mean_probe_norm" in list_metrics()
        res = evaluate(env["gen"], env["manifest"], ["mean_probe_norm"], None, progress=False)
        assert res["metrics"]["mean_probe_norm"]["value"] > 0 and res["metrics"]["mean_probe_norm"]["n"] == 6
    finally:
        REGISTRY.pop("mean_probe_norm")


def test_a_head_below_its_floor_refuses_only_its_metrics(env, tmp_path):
    from eval.probe import Probe

    evaluate(env["gen"], env["manifest"], ["fd_probe"], None, n_bootstrap=10, progress=False)  # trains the probe
    probe = Probe.load(next((env["root"] / "cache" / "probes").glob("*.pt")))
    c = probe.info["contrastive"]
    probe.info["contrastive"] = {**c, "recall": c["chance"], "z": 0.0, "p": 0.5}  # a head at chance
    probe.save(tmp_path / "weak.pt")
    res = evaluate(env["gen"], env["manifest"], ["fd_probe", "clap_probe"], None, probe_path=tmp_path / "weak.pt",
                   n_bootstrap=10, progress=False)
    assert res["metrics"]["fd_probe"]["value"] is not None
    clap = res["metrics"]["clap_probe"]
    assert clap["value"] is None and "refused: " in clap["reason"] and "too weak" in clap["reason"]
    with pytest.raises(ValueError, match="metric clap_probe: refused: .*recall@"):
        evaluate(env["gen"], env["manifest"], ["clap_probe"], None, probe_path=tmp_path / "weak.pt", progress=False)
