import json

import pytest
import soundfile as sf
import torch
import yaml

from tests.test_diffusion import LatentCodec, latent_prepared, tiny_two_stage_config
from ttm.config import load_config
from ttm.rundir import read_log


class FakeEncoder:
    """A deterministic stand-in for the frozen text encoder (dim 8, 4 tokens)."""

    dim = 8

    def encode(self, captions):
        emb = torch.stack([torch.randn(4, 8, generator=torch.Generator().manual_seed(sum(map(ord, c))))
                           for c in captions])
        mask = torch.ones(len(captions), 4, dtype=torch.bool)
        for i, c in enumerate(captions):
            if not c:
                mask[i] = False
        return emb, mask

    def identity(self):
        return {"name": "fake"}


def _patch(mp: pytest.MonkeyPatch, data) -> None:
    import ttm.prepare

    mp.setattr(ttm.prepare, "prepare", lambda cfg, progress=True, **kw: data)
    mp.setattr(ttm.prepare, "build_text_encoder_for", lambda cfg: FakeEncoder())


TARGET = 80_000


@pytest.fixture(scope="module")
def data():
    return latent_prepared()


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, data):
    """`ttm-bench train` on a two-stage config (8 steps: 4 per stage, matched total params)."""
    from ttm.cli import main

    tmp = tmp_path_factory.mktemp("two_stage")
    cfg = tiny_two_stage_config(**{"model.target_params": TARGET})
    cfg_file = tmp / "cfg.yaml"
    cfg_file.write_text(yaml.safe_dump(cfg.to_dict()))
    run_dir = tmp / "run"
    with pytest.MonkeyPatch.context() as mp:
        _patch(mp, data)
        assert main(["train", str(cfg_file), "--out", str(run_dir), "--no-progress"]) == 0
    return run_dir


# ----------------------------------------------------------------------------- configs


def test_stage_configs_split_budget_and_params():
    from ttm.two_stage import stage_configs

    cfg = tiny_two_stage_config(**{"train.steps": 9, "model.target_params": 100_000,
                                   "model.diffusion.stage2_fraction": 0.25})
    c1, c2 = stage_configs(cfg)
    assert (c1.model.kind, c1.model.pattern, c1.model.first_k) == ("lm", "first_k", 1)
    assert c2.model.kind == "diffusion"
    assert c1.train.budget.limit + c2.train.budget.limit == 9 and c1.train.budget.limit == 7
    assert (c1.model.target_params, c2.model.diffusion.target_params) == (75_000, 25_000)
    flops = tiny_two_stage_config(**{"train.budget": {"kind": "flops", "limit": 1e12}})
    f1, f2 = stage_configs(flops)
    assert (f1.train.budget.kind, f1.train.budget.limit, f2.train.budget.limit) == ("flops", 5e11, 5e11)
    with pytest.raises(ValueError, match="model.kind=two_stage"):
        stage_configs(load_config(None, {}))
    with pytest.raises(ValueError, match="stage2_fraction"):
        tiny_two_stage_config(**{"model.diffusion.stage2_fraction": 1.0})


def test_build_model_refuses_a_whole_two_stage_config():
    from ttm.factory import build_model

    with pytest.raises(ValueError, match="run_two_stage"):
        build_model(tiny_two_stage_config(), 3, 16, 8)
    with pytest.raises(ValueError, match="needs the prepared data"):
        build_model(tiny_two_stage_config(**{"model.kind": "diffusion"}), 3, 16, 8)


def test_codec_without_latents_fails_before_training(tmp_path):
    from tests.synthetic import synthetic_prepared
    from ttm.two_stage import run_two_stage

    with pytest.raises(ValueError, match="continuous latents"):
        run_two_stage(tiny_two_stage_config(), tmp_path / "run", data=synthetic_prepared(), progress=False)
    assert not (tmp_path / "run" / "stage1").exists()


# ----------------------------------------------------------------------------- training


@pytest.mark.slow
def test_two_stage_run_dir_and_summary(trained_run):
    s = json.loads((trained_run / "summary.json").read_text())
    s1, s2 = (json.loads((trained_run / st / "summary.json").read_text()) for st in ("stage1", "stage2"))
    assert s["status"] == "ok" and s["kind"] == "two_stage"
    assert s["params"] == s1["params"] + s2["params"]
    assert abs(s["params"] - TARGET) / TARGET < 0.05  # matched TOTAL params
    assert abs(s1["params"] - TARGET / 2) / TARGET < 0.05 and abs(s2["params"] - TARGET / 2) / TARGET < 0.05
    assert s["flops"] == s1["flops"] + s2["flops"] and s1["flops"] > 0 and s2["flops"] > 0
    assert (s1["steps"], s2["steps"], s["steps"]) == (4, 4, 8) and s["budget"]["used"] == 8
    assert s["stages"]["stage2"]["backbone_config"]["bidirectional"] == "sum"
    assert s["val_loss"] is None and s["val_loss_stage2"] is not None
    c1, c2 = (load_config(trained_run / st / "config.yaml") for st in ("stage1", "stage2"))
    assert c1.model.pattern == "first_k" and c2.model.kind == "diffusion"
    assert load_config(trained_run / "config.yaml").model.kind == "two_stage"
    for st in ("stage1", "stage2"):
        assert (trained_run / st / "checkpoint.pt").exists() and read_log(trained_run / st / "log.jsonl")
    sd = torch.load(trained_run / "stage2" / "checkpoint.pt", weights_only=True)["model"]
    assert "latent_std" in sd and not any("books" in k for k in sd)


@pytest.mark.slow
def test_rerun_of_a_finished_two_stage_run_trains_nothing(trained_run, data):
    from ttm.runs import train as run

    before = [read_log(trained_run / st / "log.jsonl") for st in ("stage1", "stage2")]
    s = run(load_config(trained_run / "config.yaml"), trained_run, data=data, progress=False)
    assert s["steps"] == 8
    assert [read_log(trained_run / st / "log.jsonl") for st in ("stage1", "stage2")] == before


# ----------------------------------------------------------------------------- generation


@pytest.mark.slow
def test_generate_cli_on_a_two_stage_run(trained_run, data, tmp_path):
    from ttm.cli import main

    outs = []
    with pytest.MonkeyPatch.context() as mp:
        _patch(mp, data)
        for name in ("a", "b"):
            out = tmp_path / name
            assert main(["generate", str(trained_run), "--split", "test", "--n", "2", "--out", str(out),
                         "--steps", "3", "--sampler", "ancestral"]) == 0
            outs.append(out)
    rows = [json.loads(r) for r in (outs[0] / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and {"file", "caption", "seed", "attributes"} <= set(rows[0])
    assert rows[0]["caption"] == data.splits["test"].captions[0]
    for r in rows:
        wav, sr = sf.read(outs[0] / r["file"])
        assert sr == LatentCodec.sample_rate and len(wav) == 16 * LatentCodec.hop and abs(wav).max() > 0
        assert (outs[0] / r["file"]).read_bytes() == (outs[1] / r["file"]).read_bytes()  # same seed, same clip


@pytest.mark.slow
def test_pipeline_cell_trains_generates_and_records(trained_run, data):
    from ablations.pipeline import run_cell

    with pytest.MonkeyPatch.context() as mp:
        _patch(mp, data)
        s = run_cell(load_config(trained_run / "config.yaml"), trained_run, progress=False)
    assert s["status"] == "ok" and s["generation"]["n_clips"] == 2 and s["generation"]["diffusion_steps"] == 4
    assert len((trained_run / "samples" / "samples.jsonl").read_text().splitlines()) == 2
    assert json.loads((trained_run / "summary.json").read_text())["generation"]["diffusion_time_s"] > 0


@pytest.mark.slow
def test_two_stage_cell_end_to_end_on_the_tiny_preset(tmp_path):
    """The transformer two-stage cell of ablations/two_stage.yaml (tiny preset) on the real
    embedded dataset: both stages train, clips are generated and evaluated."""
    import json
    from pathlib import Path

    from ablations.pipeline import run_cell
    from ablations.spec import expand, load_spec
    from ttm.config import config_from_dict

    spec = load_spec(Path(__file__).resolve().parents[1] / "ablations" / "two_stage.yaml")
    cell = next(c for c in expand(spec, "tiny", overrides={"data.root": str(tmp_path / "data")})
                if c.config["model"]["kind"] == "two_stage" and c.config["model"]["backbone"] == "transformer")
    s = run_cell(config_from_dict(cell.config, "two_stage.yaml"), tmp_path / "run", progress=False)
    assert s["status"] == "ok"
    assert s["params"] == s["stages"]["stage1"]["params"] + s["stages"]["stage2"]["params"]
    assert s["flops"] == s["stages"]["stage1"]["flops"] + s["stages"]["stage2"]["flops"]
    rows = [json.loads(r) for r in (tmp_path / "run" / "samples" / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and all((tmp_path / "run" / "samples" / r["file"]).stat().st_size > 1000 for r in rows)
    assert {"fd_probe", "adherence"} <= set(s["metrics"])


@pytest.mark.slow
def test_generate_refuses_bad_requests_before_loading(trained_run, data, tmp_path, capsys):
    from ttm.cli import main

    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    fr = LatentCodec.frame_rate if hasattr(LatentCodec, "frame_rate") else data.codec.frame_rate
    with pytest.MonkeyPatch.context() as mp:
        _patch(mp, data)
        base = ["generate", str(trained_run), "--split", "test", "--n", "1"]
        for extra, needle in ((["--seconds", "-1", "--out", str(tmp_path / "o")], "--seconds: expected > 0"),
                              (["--batch-size", "0", "--out", str(tmp_path / "o")], "--batch-size: expected >= 1")):
            with pytest.raises(SystemExit) as e:
                main(base + extra)
            assert e.value.code == 2 and needle in capsys.readouterr().err
        assert main(base + ["--out", str(a_file)]) == 2
        assert "is a file, expected a directory" in capsys.readouterr().err
        # 12x the 16-frame training clips: refused, naming the way out
        long_s = str(12 * 16 / fr)
        assert main(base + ["--out", str(tmp_path / "long"), "--seconds", long_s, "--steps", "2"]) == 2
        assert "--allow-long" in capsys.readouterr().err
        # 3x: generated, with a warning
        assert main(base + ["--out", str(tmp_path / "x3"), "--seconds", str(3 * 16 / fr), "--steps", "2"]) == 0
        assert "3.0x the" in capsys.readouterr().err
    assert not (tmp_path / "long" / "samples.jsonl").exists()
