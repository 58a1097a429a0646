"""eval.embedders and eval.probe on tiny random models saved to temp dirs, and a synthetic set."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from eval.embedders import get_embedder, list_embedders
from eval.embedders.base import cover_windows, resolve_checkpoint
from ttm.audio import load_audio, save_audio

# ----------------------------------------------------------------------------- helpers (also used by test_eval_runner)


def synth_clip(family: str, tempo: str, f0: float, sr: int = 16000, dur: float = 1.0, seed: int = 0) -> np.ndarray:
    """A sine / square / noise tone gated on and off at 2 Hz (slow) or 8 Hz (fast)."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(sr * dur)) / sr
    if family == "sine":
        x = np.sin(2 * np.pi * f0 * t)
    elif family == "square":
        x = np.sign(np.sin(2 * np.pi * f0 * t))
    else:
        x = rng.standard_normal(len(t))
    rate = 2.0 if tempo == "slow" else 8.0
    gate = (np.sin(2 * np.pi * rate * t + rng.uniform(0, 2 * np.pi)) > 0).astype(float)
    return (0.3 * x * gate).astype(np.float32)


def make_set(root: Path, shuffle_labels: bool = False, shuffle_captions: bool = False) -> Path:
    """36 one-second clips (3 families x 2 tempi x 6 pitches): 24 train, 6 valid, 6 test.
    Held-out clips use pitches never seen in training."""
    (root / "audio").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(7)
    lines, k = [], 0
    for family in ("sine", "square", "noise"):
        for tempo in ("slow", "fast"):
            for j, f0 in enumerate((220, 330, 440, 550, 660, 880)):
                split = {4: "valid", 5: "test"}.get(j, "train")
                cid = f"{family}-{tempo}-{j}"
                save_audio(root / "audio" / f"{cid}.wav", synth_clip(family, tempo, f0, seed=k), 16000)
                attrs = {"family": family, "tempo": tempo}
                if shuffle_labels:
                    attrs = {"family": str(rng.choice(["sine", "square", "noise"])), "tempo": str(rng.choice(["slow", "fast"]))}
                caption = f"A {tempo} {family} tone."
                if shuffle_captions:  # captions drawn at random, unrelated to the audio
                    caption = f"A {rng.choice(['slow', 'fast'])} {rng.choice(['sine', 'square', 'noise'])} tone."
                lines.append({"id": cid, "path": f"audio/{cid}.wav", "caption": caption, "split": split,
                                  "piece": cid, "duration": 1.0, "sample_rate": 16000, "attributes": attrs})
                k += 1
    (root / "manifest.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return root / "manifest.jsonl"


def tiny_clap(d: Path, collapsed: bool = False) -> Path:
    from transformers import ClapConfig, ClapFeatureExtractor, ClapModel, ClapProcessor, RobertaTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3, "<mask>": 4}
    for c in bytes_to_unicode().values():
        vocab.setdefault(c, len(vocab))
    # initializer_factor 5: a 1-layer random text tower at the default scale maps every caption
    # to nearly the same vector (the collapse guard would refuse it, rightly)
    cfg = ClapConfig(
        text_config={"vocab_size": len(vocab), "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                         "intermediate_size": 37, "max_position_embeddings": 128, "initializer_factor": 5.0},
        audio_config={"num_mel_bins": 16, "spec_size": 128, "window_size": 4, "patch_size": 4, "patch_stride": 4, "hidden_size": 32,
                          "patch_embeds_hidden_size": 16, "depths": [1, 1], "num_attention_heads": [2, 2], "num_hidden_layers": 2},
        projection_dim=16,
    )
    torch.manual_seed(0)
    model = ClapModel(cfg)
    if collapsed:  # every caption -> the same text embedding
        with torch.no_grad():
            model.text_projection.linear2.weight.zero_()
            model.text_projection.linear2.bias.fill_(0.5)
    model.save_pretrained(d)
    fe = ClapFeatureExtractor(feature_size=16, sampling_rate=48000, truncation="rand_trunc")
    ClapProcessor(feature_extractor=fe, tokenizer=RobertaTokenizer(vocab=vocab, merges=[])).save_pretrained(d)
    return d


def tiny_ast(d: Path) -> Path:
    from transformers import ASTConfig, ASTFeatureExtractor, ASTForAudioClassification

    labels = {i: f"label{i}" for i in range(5)}
    cfg = ASTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37, num_mel_bins=16,
                    max_length=1024, id2label=labels, label2id={v: k for k, v in labels.items()})
    torch.manual_seed(0)
    ASTForAudioClassification(cfg).save_pretrained(d)
    ASTFeatureExtractor(num_mel_bins=16, max_length=1024, sampling_rate=16000).save_pretrained(d)
    return d


def tiny_encodec(d: Path) -> Path:
    from transformers import EncodecConfig, EncodecModel

    cfg = EncodecConfig(audio_channels=1, sampling_rate=24000, num_filters=4, hidden_size=16,
                        upsampling_ratios=[8, 5, 4, 2], codebook_size=16, codebook_dim=16, num_lstm_layers=1)
    torch.manual_seed(0)
    EncodecModel(cfg).save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {"clap": tiny_clap(root / "clap"), "ast": tiny_ast(root / "ast"), "encodec": tiny_encodec(root / "encodec")}


# ----------------------------------------------------------------------------- registry, weights


def test_registry_lists_every_embedder():
    assert {"probe", "clap", "ast", "encodec", "vggish"} <= set(list_embedders())
    with pytest.raises(ValueError, match="unknown embedder 'nope'"):
        get_embedder("nope")


def test_missing_weights_are_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    with pytest.raises(FileNotFoundError, match=r"clap: checkpoint directory .*missing not found"):
        resolve_checkpoint(tmp_path / "missing", "clap")
    with pytest.raises(FileNotFoundError, match="fad_encodec: weights 'facebook/encodec_24khz' are not a local directory"):
        resolve_checkpoint("facebook/encodec_24khz", "fad_encodec")
    ok, why = get_embedder("ast", ckpt=str(tmp_path / "nowhere")).available()
    assert not ok and "nowhere" in why


def test_cover_windows():
    assert cover_windows(25, 10, 10) == [(0, 10), (10, 20), (15, 25)]
    assert cover_windows(7, 10, 10) == [(0, 7)]
    assert cover_windows(20, 10, 5) == [(0, 10), (5, 15), (10, 20)]


# ----------------------------------------------------------------------------- pretrained embedders (tiny models)


def test_clap_audio_and_text_embeddings(models):
    emb = get_embedder("clap", ckpt=str(models["clap"]), window_s=1.0, hop_s=1.0)
    assert emb.available() == (True, "") and emb.sample_rate == 48000 and emb.dim == 16
    wav = torch.randn(1, int(2.5 * 48000)) * 0.1
    frames = emb.embed(wav)  # windows (0, 1), (1, 2), (1.5, 2.5) s
    assert frames.shape == (3, 16)
    assert torch.allclose(frames.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert emb.embed_clip(wav).shape == (16,)
    text = emb.embed_text(["a slow violin", "a fast drum solo", "rain"])
    assert text.shape == (3, 16)
    assert emb.check_text_collapse() < 0.99


def test_clap_collapse_guard_refuses_a_collapsed_checkpoint(tmp_path):
    emb = get_embedder("clap", ckpt=str(tiny_clap(tmp_path / "collapsed", collapsed=True)))
    with pytest.raises(ValueError, match=r"text embeddings collapse \(mean pairwise cosine 1\.0000"):
        emb.embed(torch.zeros(1, 48000))


def test_cache_key_changes_with_every_setting(models, tmp_path):
    keys = {
        get_embedder("clap", ckpt=str(models["clap"])).cache_key(),
        get_embedder("clap", ckpt=str(models["clap"]), window_s=5.0).cache_key(),
        get_embedder("clap", ckpt=str(models["clap"]), hop_s=5.0).cache_key(),
        get_embedder("clap", ckpt=str(tiny_clap(tmp_path / "other"))).cache_key(),
        get_embedder("ast", ckpt=str(models["ast"])).cache_key(),
        get_embedder("ast", ckpt=str(models["ast"]), windowing="sam").cache_key(),
        get_embedder("clap", ckpt="laion/clap-htsat-unfused").cache_key(),
        get_embedder("clap", ckpt="laion/clap-htsat-unfused", revision="abc").cache_key(),
    }
    assert len(keys) == 8
    key = json.loads(get_embedder("clap", ckpt=str(models["clap"])).cache_key())
    assert key["sample_rate"] == 48000 and key["window_s"] == 10.0 and key["ckpt"] == str(models["clap"].resolve())


def test_ast_windowing_and_logits(models):
    x = torch.randn(1, 21 * 16000) * 0.1
    ac = get_embedder("ast", ckpt=str(models["ast"]))
    f = ac.features(x)  # 10 s + 10 s + 1 s segments
    assert f["emb"].shape == (3, 32) and f["logits"].shape == (3, 5)
    assert ac.labels == [f"label{i}" for i in range(5)]
    sam = get_embedder("ast", ckpt=str(models["ast"]), windowing="sam")
    assert sam.logits(x).shape == (4, 5)  # windows start at 0, 5, 10, 15 s
    # the stable-audio-metrics windowing peak-normalises: the gain of the input does not matter
    assert np.allclose(sam.logits(x), sam.logits(3 * x), atol=1e-4)
    with pytest.raises(ValueError, match="windowing must be one of"):
        get_embedder("ast", ckpt=str(models["ast"]), windowing="hop")


def test_encodec_frames(models):
    emb = get_embedder("encodec", ckpt=str(models["encodec"]))
    assert emb.sample_rate == 24000 and emb.dim == 16
    frames = emb.embed(torch.randn(1, 24000) * 0.1)
    assert frames.shape == (75, 16)  # 75 frames/s
    x = torch.randn(1, 12000)
    assert torch.allclose(emb.embed_clip(x), emb.embed(x).mean(0))


def test_embedders_take_resampled_audio(models, tmp_path):
    # a 16 kHz file read at the embedder's rate gives a clip of the right length in its frames
    x = (np.random.default_rng(0).standard_normal(16000) * 0.1).astype(np.float32)
    save_audio(tmp_path / "a.wav", x, 16000)
    emb = get_embedder("encodec", ckpt=str(models["encodec"]))
    wav = load_audio(tmp_path / "a.wav", emb.sample_rate)
    assert wav.shape == (1, 24000)
    assert emb.embed(wav).shape == (75, 16)


# ----------------------------------------------------------------------------- VGGish


def _vggish_reference_mel(n_bins=257, n_mels=64, sr=16000, lo=125.0, hi=7500.0):
    """VGGish's mel_features.spectrogram_to_mel_matrix, written out."""
    def mel(f):
        return 1127.0 * np.log(1.0 + f / 700.0)

    bins_mel = mel(np.linspace(0.0, sr / 2, n_bins))
    edges = np.linspace(mel(lo), mel(hi), n_mels + 2)
    w = np.empty((n_bins, n_mels))
    for i in range(n_mels):
        lower, center, upper = edges[i : i + 3]
        w[:, i] = np.maximum(0.0, np.minimum((bins_mel - lower) / (center - lower), (upper - bins_mel) / (upper - center)))
    w[0, :] = 0.0
    return w


def test_vggish_mel_matrix_matches_vggish():
    from eval.embedders.vggish import vggish_mel_matrix

    assert np.allclose(vggish_mel_matrix(), _vggish_reference_mel(), atol=1e-10)


def test_vggish_needs_local_weights(tmp_path, monkeypatch):
    from eval.embedders.vggish import VGGishNet

    monkeypatch.delenv("TTM_BENCH_VGGISH", raising=False)
    ok, why = get_embedder("vggish").available()
    assert not ok and "TTM_BENCH_VGGISH" in why
    with pytest.raises(FileNotFoundError, match="no weights given"):
        get_embedder("vggish").embed(torch.zeros(1, 16000))
    torch.manual_seed(0)
    torch.save(VGGishNet().state_dict(), tmp_path / "vggish.pth")
    monkeypatch.setenv("TTM_BENCH_VGGISH", str(tmp_path / "vggish.pth"))
    emb = get_embedder("vggish")
    assert emb.available() == (True, "")
    assert emb.embed(torch.randn(1, 32000) * 0.1).shape == (2, 128)  # 198 frames -> 2 examples of 96
    assert emb.embed(torch.randn(1, 4000)).shape == (1, 128)  # padded to one 0.96 s example
    torch.save({"features.0.weight": torch.zeros(3)}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="not in the torchvggish layout"):
        get_embedder("vggish", weights=tmp_path / "bad.pth").embed(torch.zeros(1, 16000))


# ----------------------------------------------------------------------------- probe


@pytest.fixture(scope="module")
def probe_set(tmp_path_factory):
    from eval.probe import train_probe

    root = tmp_path_factory.mktemp("probe")
    manifest = make_set(root / "set")
    probe = train_probe(manifest, root / "probe.pt", seed=0, progress=False)
    return manifest, root / "probe.pt", probe


def test_probe_beats_chance_on_heldout_clips(probe_set):
    manifest, _path, probe = probe_set
    acc, chance = probe.heldout_accuracy, probe.chance
    assert set(probe.classes) == {"family", "tempo"}  # the only attributes with >= 2 classes
    assert acc["mean"] >= chance["mean"] + 0.3
    assert acc["family"] > chance["family"] + 0.2 and acc["tempo"] > chance["tempo"] + 0.2
    probe.check_quality()
    held = [json.loads(x) for x in manifest.read_text().splitlines() if json.loads(x)["split"] != "train"]
    wavs = [load_audio(manifest.parent / e["path"], probe.sample_rate)[0] for e in held]
    assert probe.embed(wavs).shape == (len(held), probe.dim)
    pred = probe.predict(wavs)
    assert all(p in probe.classes["family"] for p in pred["family"])
    measured = np.mean([p == e["attributes"]["tempo"] for p, e in zip(pred["tempo"], held)])
    assert measured == pytest.approx(acc["tempo"])


def test_probe_is_level_invariant(probe_set):
    """The same clips at full scale, -20 dB and +6 dB (clipped to [-1, 1]): under 5% of predictions
    flip, and the FD between a set and its level-shifted copy stays below the FD noise floor
    (two disjoint halves of the set), in the PCA space the runner would use."""
    from eval import metrics as M
    from eval.stats import Pca

    manifest, _path, probe = probe_set
    entries = [json.loads(x) for x in manifest.read_text().splitlines()]
    wavs = [load_audio(manifest.parent / e["path"], probe.sample_rate)[0] for e in entries]
    wavs = [0.9 * w / w.abs().max() for w in wavs]  # full scale
    levels = {"0 dB": wavs, "-20 dB": [w * 0.1 for w in wavs], "+6 dB clipped": [(w * 2).clamp(-1, 1) for w in wavs]}
    pred = {k: probe.predict(v) for k, v in levels.items()}
    emb = {k: probe.embed(v).numpy().astype(np.float64) for k, v in levels.items()}
    train = [i for i, e in enumerate(entries) if e["split"] == "train"]
    pca = Pca.fit(emb["0 dB"][train], "train split")
    x = {k: pca.project(v, 8) for k, v in emb.items()}  # 8 dims: 18 clips per half >= 2 D
    half = np.random.default_rng(0).permutation(len(entries))
    a, b = half[:18], half[18:]
    noise = M.fd_fast(x["0 dB"][a], x["0 dB"][b])
    for k in ("-20 dB", "+6 dB clipped"):
        flips = np.mean([p != q for attr in probe.classes for p, q in zip(pred["0 dB"][attr], pred[k][attr])])
        fd_copy = M.fd_fast(x["0 dB"], x[k])
        moved = abs(M.fd_fast(x[k][a], x["0 dB"][b]) - noise)
        print(f"{k}: flips {flips:.3f}, FD(set, copy) {fd_copy:.4g}, FD moved by {moved:.4g}, noise floor {noise:.4g}")
        assert flips < 0.05
        assert fd_copy < noise and moved < noise


def test_probe_is_reloaded_when_the_manifest_is_unchanged(probe_set):
    from eval.probe import Probe, train_probe

    manifest, path, probe = probe_set
    again = train_probe(manifest, path, seed=0, progress=False)
    assert again.identity() == probe.identity()
    assert Probe.load(path).heldout_accuracy == probe.heldout_accuracy
    (path.parent / "junk.pt").write_bytes(b"junk")
    with pytest.raises(ValueError, match="not a probe file"):
        Probe.load(path.parent / "junk.pt")


def test_probe_embedder_caches_by_weights(probe_set):
    _, path, probe = probe_set
    emb = get_embedder("probe", ckpt=str(path))
    assert emb.available() == (True, "")
    f = emb.features(torch.randn(1, 16000) * 0.1)
    assert f["emb"].shape == (1, probe.dim) and f["logits_family"].shape == (1, 3)
    assert json.loads(emb.cache_key())["weights"] == probe.identity()["weights"]
    assert not get_embedder("probe").available()[0]


def test_quality_floor_needs_significance(probe_set):
    from eval.probe import Probe

    _, _, good = probe_set
    z, p = good.significance()
    assert z > 1.645 and p < 0.05
    # the same probe with held-out accuracy exactly at chance: z = 0, p = 0.5, refused even with no margin
    info = {**good.info, "heldout_accuracy": dict(good.info["chance"])}
    at_chance = Probe(good.net, good.settings, good.classes, info)
    assert at_chance.significance() == pytest.approx((0.0, 0.5))
    with pytest.raises(ValueError, match=r"one-sided p = 0\.5 against chance"):
        at_chance.check_quality(frac=0.0)


def test_quality_floor_refuses_a_bad_probe(tmp_path):
    from eval.probe import train_probe

    # labels drawn at random, unrelated to the audio: held-out accuracy stays near chance
    manifest = make_set(tmp_path / "set", shuffle_labels=True)
    bad = train_probe(manifest, tmp_path / "bad.pt", seed=0, epochs=10, progress=False)
    _, p = bad.significance()
    assert p >= 0.05
    with pytest.raises(ValueError, match=r"mean held-out accuracy 0\.\d+ \(required 0\.\d+ .*one-sided p = "):
        bad.check_quality()


def test_contrastive_head_beats_chance_and_its_floor_refuses_shuffled_captions(probe_set, tmp_path):
    from eval.probe import caption_embeddings, train_probe

    manifest, _path, probe = probe_set
    c = probe.info["contrastive"]
    print(f"contrastive head: held-out recall@{c['k']} {c['recall']:.3f}, chance {c['chance']:.3f}, p {c['p']:.2g}")
    assert c["recall"] > c["chance"] and c["p"] < 0.05
    probe.check_contrastive_quality()
    # the CLAP-style score: a clip is closer to its own caption than to the others
    held = [json.loads(x) for x in manifest.read_text().splitlines() if json.loads(x)["split"] != "train"]
    audio = probe.audio_text([load_audio(manifest.parent / e["path"], probe.sample_rate)[0] for e in held])
    text = caption_embeddings(probe.text_encoder(), [e["caption"] for e in held])
    cos = audio @ text.T  # [N, N]
    same = torch.tensor([[a["caption"] == b["caption"] for b in held] for a in held])
    assert cos[same].mean() > cos[~same].mean() + 0.1
    bad = train_probe(make_set(tmp_path / "set", shuffle_captions=True), tmp_path / "bad.pt", seed=0, epochs=10,
                      progress=False)
    cb = bad.info["contrastive"]
    print(f"shuffled captions: recall@{cb['k']} {cb['recall']:.3f}, chance {cb['chance']:.3f}, p {cb['p']:.2g}")
    with pytest.raises(ValueError, match=r"contrastive head held-out text-to-audio recall@\d+ .* too weak"):
        bad.check_contrastive_quality()


def test_probe_needs_train_and_heldout_clips(tmp_path):
    from eval.probe import train_probe

    manifest = make_set(tmp_path / "set")
    lines = [json.loads(x) for x in manifest.read_text().splitlines()]
    only_train = tmp_path / "set" / "train_only.jsonl"
    only_train.write_text("".join(json.dumps({**x, "split": "train"}) + "\n" for x in lines))
    with pytest.raises(ValueError, match="needs valid/test clips"):
        train_probe(only_train, tmp_path / "p.pt", progress=False)
    no_attr = tmp_path / "set" / "no_attr.jsonl"
    no_attr.write_text("".join(json.dumps({**x, "attributes": {}}) + "\n" for x in lines))
    with pytest.raises(ValueError, match="no attribute among"):
        train_probe(no_attr, tmp_path / "p.pt", progress=False)


def test_retrieval_recall_p_is_the_exact_tail_of_its_hit_count():
    """12 clips with distinct captions (k = 1: a tenth of 12 clips, at least 1; chance 1/12 per
    query), 7 captions rank their own clip first, 5 another: p = P(Binomial(12, 1/12) >= 7); and
    with two queries of different chance, the tail by hand."""
    from scipy.stats import binom

    from eval.probe import retrieval_recall

    text = torch.eye(12)
    audio = torch.eye(12)[[0, 1, 2, 3, 4, 5, 6, 8, 9, 10, 11, 7]]  # clips 7-11: the next caption's vector
    r = retrieval_recall(audio, text, [f"c{i}" for i in range(12)], k=5)
    assert r["k"] == 1 and r["queries"] == 12 and r["recall"] == pytest.approx(7 / 12)
    assert r["chance"] == pytest.approx(1 / 12) and r["p"] == pytest.approx(binom.sf(6, 12, 1 / 12), rel=1e-9)
    # 10 clips, captions a (clips 0-1) and b..i (one clip each), k = 1: chance 2/10 for a, 1/10 for b..i;
    # only a's query hits: P(S >= 1) = 1 - 0.8 * 0.9**8
    caps = ["a", "a"] + list("bcdefghi")
    text = torch.stack([torch.eye(10)[0 if c == "a" else caps.index(c)] for c in caps])
    audio = torch.eye(10)[[0, 0, 3, 4, 5, 6, 7, 8, 9, 2]]  # a's clips match a; every other query misses
    r = retrieval_recall(audio, text, caps, k=1)
    assert r["queries"] == 9 and r["recall"] == pytest.approx(1 / 9)
    assert r["p"] == pytest.approx(1 - 0.8 * 0.9**8, rel=1e-9)


def test_retrieval_recall_p_is_calibrated_under_chance_with_repeated_captions():
    """Unrelated audio and caption embeddings, 40 clips over 10 captions (4 clips each), recall@3:
    the floor's test must reject at most its level (0.05) of the time. Counting each clip as a
    query (identical captions: identical rankings) would multiply one outcome by 4."""
    from eval.probe import retrieval_recall

    g = torch.Generator().manual_seed(0)
    caps = [f"caption {i % 10}" for i in range(40)]
    text_of = {c: torch.randn(8, generator=g) for c in caps}
    trials, rejected = 1000, 0
    for _ in range(trials):
        audio = torch.nn.functional.normalize(torch.randn(40, 8, generator=g), dim=-1)
        text = torch.nn.functional.normalize(torch.stack([text_of[c] for c in caps]), dim=-1)
        r = retrieval_recall(audio, text, caps, k=3)
        assert r["queries"] == 10 and r["clips"] == 40
        rejected += r["p"] < 0.05
    # the exact test is conservative on a discrete count: at most its level, plus 3 Monte Carlo SE
    assert rejected / trials <= 0.05 + 3 * (0.05 * 0.95 / trials) ** 0.5
