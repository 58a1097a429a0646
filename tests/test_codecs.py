"""Codecs: melrvq (fit, codes, decode, save/load), token caching, EnCodec/DAC adapters on tiny models."""

from __future__ import annotations

import json
import math

import pytest
import torch

from ttm.audio import save_audio
from ttm.codecs import build_codec, load_codec
from ttm.codecs.cli import fit_or_load_melrvq, tokenize_main, tokenize_manifest
from ttm.codecs.melrvq import MelRVQCodec

SR = 16000
SMALL = {"n_codebooks": 3, "cardinality": 16, "kmeans_iters": 30}


def sine(freqs, seconds=1.0, amp=0.3, seed=0):
    t = torch.arange(int(seconds * SR)) / SR
    g = torch.Generator().manual_seed(seed)
    x = sum(torch.sin(2 * math.pi * f * t) for f in freqs) * (amp / len(freqs))
    return (x + 0.003 * torch.randn(t.shape, generator=g))[None]  # [1, N]


def noise_bursts(seconds=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = int(seconds * SR)
    env = (torch.arange(n) % 4000 < 1000).float()
    return (0.2 * torch.randn(n, generator=g) * env)[None]


def clips():
    out = [sine([f], seed=i) for i, f in enumerate([110, 220, 330, 440, 660, 880, 1320, 2000])]
    out += [sine([261.6, 329.6, 392.0], seed=20), sine([220, 277.2, 329.6], seed=21)]
    out += [noise_bursts(seed=30), noise_bursts(seed=31)]
    return out


@pytest.fixture(scope="module")
def train_clips():
    return clips()


@pytest.fixture(scope="module")
def codec(train_clips):
    return MelRVQCodec(**SMALL).fit(train_clips, seed=0)


def log_mel_l1(codec, a, b):
    n = min(a.shape[-1], b.shape[-1])
    return (codec.log_mel(a[..., :n]) - codec.log_mel(b[..., :n])).abs().mean().item()


# ----------------------------------------------------------------------------- melrvq


def test_melrvq_fit_is_deterministic(train_clips, codec):
    again = MelRVQCodec(**SMALL).fit(train_clips, seed=0)
    assert torch.equal(again.codebooks, codec.codebooks)
    assert torch.equal(again.mean, codec.mean) and torch.equal(again.std, codec.std)
    assert again.identity() == codec.identity()
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=2):  # k-means must not depend on the thread count
        two = MelRVQCodec(**SMALL).fit(train_clips, seed=0)
    assert torch.equal(two.codebooks, codec.codebooks)
    other = MelRVQCodec(**SMALL).fit(train_clips, seed=1)
    assert not torch.equal(other.codebooks, codec.codebooks)
    assert other.identity_hash() != codec.identity_hash()
    assert codec.codebooks.shape == (3, 16, 64)


def test_melrvq_subsampled_fit_is_deterministic(train_clips):
    a = MelRVQCodec(**SMALL, max_fit_frames=200).fit(train_clips, seed=3)
    b = MelRVQCodec(**SMALL, max_fit_frames=200).fit(iter(train_clips), seed=3)  # any iterable
    assert torch.equal(a.codebooks, b.codebooks)
    # mean/std still use every frame
    full = MelRVQCodec(**SMALL).fit(train_clips, seed=3)
    assert torch.allclose(a.mean, full.mean) and torch.allclose(a.std, full.std)


def test_melrvq_codes_shape_and_range(codec, train_clips):
    x = torch.stack(train_clips[:4])  # [4, 1, N]
    codes = codec.encode(x)
    assert codes.dtype == torch.int64
    assert codes.shape == (4, 3, codec.n_frames(x.shape[-1])) == (4, 3, SR // 320 + 1)
    assert int(codes.min()) >= 0 and int(codes.max()) < codec.cardinality
    assert codec.frame_rate == 50.0
    # batch encoding equals one-by-one encoding
    assert torch.equal(codes[2:3], codec.encode(x[2:3]))


def test_melrvq_decode_length_and_reconstruction(codec, train_clips):
    picks = [train_clips[1], train_clips[5], train_clips[8], train_clips[10]]
    x = torch.stack(picks)  # [4, 1, N]
    y = codec.decode(codec.encode(x))
    assert y.shape[:2] == (4, 1)
    assert abs(y.shape[-1] - x.shape[-1]) <= 320
    for i in range(4):
        own = log_mel_l1(codec, y[i : i + 1], x[i : i + 1])
        others = [log_mel_l1(codec, y[i : i + 1], x[j : j + 1]) for j in range(4) if j != i]
        assert own < min(others), (i, own, others)


def test_melrvq_residual_stages_refine(codec, train_clips):
    x = torch.stack(train_clips[:6])
    z = codec.normalise(codec.log_mel(x))  # [B, M, T]
    codes = codec.encode(x)
    errs = [(codec.latent(codes[:, :k]) - z).square().mean().item() for k in range(1, 4)]
    assert errs[0] > errs[1] > errs[2]
    # the latent is the codebook sum, and decoding it equals decoding the codes
    lat = codec.latent(codes)
    assert lat.shape == (6, codec.latent_dim, codes.shape[-1])
    expect = sum(codec.codebooks[k][codes[0, k]] for k in range(3)).T
    assert torch.allclose(lat[0], expect)
    assert torch.allclose(codec.decode_latent(lat[:2]), codec.decode(codes[:2]))
    assert codec.decode_first_k(codes[:1, :1]).shape == codec.decode(codes[:1]).shape


def test_melrvq_input_handling(codec):
    mono = sine([440, 550], seed=5)
    stereo = torch.cat([mono, mono])[None]  # [1, 2, N]
    assert torch.equal(codec.encode(stereo), codec.encode(mono[None]))
    half = mono[:, ::2][None]  # 8 kHz, [1, 1, N/2]
    codes = codec.encode(half, sample_rate=8000)
    assert codes.shape[-1] == codec.n_frames(mono.shape[-1])
    with pytest.raises(ValueError, match=r"\[B, C, N\]"):
        codec.encode(mono)
    with pytest.raises(ValueError, match="values must lie in"):
        codec.decode(torch.full((1, 3, 5), 16))
    with pytest.raises(ValueError, match="1 <= K <= 3"):
        codec.decode(torch.zeros(1, 4, 5, dtype=torch.long))


def test_melrvq_errors():
    with pytest.raises(ValueError, match="not fitted"):
        MelRVQCodec(**SMALL).encode(torch.zeros(1, 1, 1000))
    with pytest.raises(ValueError, match="fewer than cardinality"):
        MelRVQCodec(n_codebooks=1, cardinality=64).fit([sine([440], seconds=0.2)])
    with pytest.raises(ValueError, match="unknown settings"):
        build_codec("melrvq", n_codebook=3)
    with pytest.raises(ValueError, match="unknown codec"):
        build_codec("mp3")


def test_melrvq_save_load_round_trip(codec, train_clips, tmp_path):
    path = codec.save(tmp_path / "c.safetensors")
    loaded = MelRVQCodec.load(path)
    x = torch.stack(train_clips[:3])
    assert torch.equal(loaded.encode(x), codec.encode(x))
    assert loaded.identity() == codec.identity()
    assert load_codec(path).identity() == codec.identity()
    assert load_codec(f"melrvq:{path}").identity() == codec.identity()
    # decode-only settings may change; code-changing ones may not
    assert MelRVQCodec.load(path, griffin_lim_iters=4).identity() == codec.identity()
    with pytest.raises(ValueError, match="cannot override"):
        MelRVQCodec.load(path, cardinality=8)
    (tmp_path / "junk.safetensors").write_bytes(b"not a codec")
    with pytest.raises(ValueError, match="not a melrvq codec file"):
        MelRVQCodec.load(tmp_path / "junk.safetensors")
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        MelRVQCodec.load(tmp_path / "missing.safetensors")
    with pytest.raises(FileNotFoundError, match="not a codec name"):
        load_codec(tmp_path / "nothing-here")


# ----------------------------------------------------------------------------- token cache


def write_dataset(root, clips_by_split):
    lines = []
    for split, wavs in clips_by_split.items():
        for i, w in enumerate(wavs):
            cid = f"{split}-{i}"
            save_audio(root / "audio" / f"{cid}.wav", w, SR)
            lines.append(
                {
                    "id": cid,
                    "path": f"audio/{cid}.wav",
                    "caption": f"clip {cid}",
                    "split": split,
                    "piece": f"p/{cid}",
                    "duration": w.shape[-1] / SR,
                    "sample_rate": SR,
                    "attributes": {"n": i, "tempo": "slow"},
                }
            )
    m = root / "manifest.jsonl"
    m.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return m


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, train_clips):
    root = tmp_path_factory.mktemp("ds")
    valid = [sine([300], seconds=0.5, seed=40), sine([500], seconds=0.8, seed=41)]
    return write_dataset(root, {"train": train_clips[:10], "valid": valid})


def test_fit_or_load_melrvq(dataset, tmp_path, monkeypatch):
    path = tmp_path / "codec.safetensors"
    c1 = fit_or_load_melrvq(dataset, path, seed=0, **SMALL)
    assert path.is_file() and c1.fit_info["n_clips"] == 10

    def no_fit(*a, **k):
        raise AssertionError("refitted although a matching codec file exists")

    monkeypatch.setattr(MelRVQCodec, "fit", no_fit)
    c2 = fit_or_load_melrvq(dataset, path, seed=0, **SMALL)
    assert torch.equal(c1.codebooks, c2.codebooks)
    with pytest.raises(ValueError, match="seed"):
        fit_or_load_melrvq(dataset, path, seed=1, **SMALL)
    with pytest.raises(ValueError, match="cardinality"):
        fit_or_load_melrvq(dataset, path, seed=0, **{**SMALL, "cardinality": 8})


def test_tokenize_manifest_and_cache(dataset, codec, tmp_path, monkeypatch):
    out = tokenize_manifest(dataset, codec, tmp_path / "tokens", progress=False, batch_size=3)
    assert out.name == codec.identity_hash()
    ident = json.loads((out / "identity.json").read_text())
    assert ident["codec"] == codec.identity() and ident["splits"]["valid"]["n"] == 2
    tr = torch.load(out / "tokens_train.pt", weights_only=True)
    va = torch.load(out / "tokens_valid.pt", weights_only=True)
    assert tr["codes"].shape == (10, 3, 51) and tr["codes"].dtype == torch.int64
    assert tr["lengths"].tolist() == [51] * 10
    assert tr["ids"][0] == "train-0" and tr["captions"][0] == "clip train-0"
    assert tr["attributes"][3] == {"n": 3, "tempo": "slow"}
    # clips of different lengths are padded to the split's longest; lengths keep the valid frames
    n0, n1 = codec.n_frames(8000), codec.n_frames(12800)
    assert va["codes"].shape == (2, 3, n1) and va["lengths"].tolist() == [n0, n1]
    assert (va["codes"][0, :, n0:] == 0).all()
    from ttm.audio import load_audio

    wav = load_audio(dataset.parent / "audio" / "valid-0.wav", SR)
    assert torch.equal(va["codes"][0, :, :n0], codec.encode(wav[None])[0])

    # second call: cache hit, nothing is encoded
    def no_encode(*a, **k):
        raise AssertionError("re-encoded although the cache is valid")

    monkeypatch.setattr(codec, "encode", no_encode)
    assert tokenize_manifest(dataset, codec, tmp_path / "tokens", progress=False) == out
    monkeypatch.undo()
    # a changed manifest re-tokenizes
    text = dataset.read_text().replace("clip valid-1", "clip valid-1 edited")
    m2 = dataset.parent / "manifest2.jsonl"
    m2.write_text(text)
    out2 = tokenize_manifest(m2, codec, tmp_path / "tokens", progress=False, max_frames=20)
    assert out2 == out
    va2 = torch.load(out / "tokens_valid.pt", weights_only=True)
    assert va2["captions"][1] == "clip valid-1 edited"
    assert va2["codes"].shape[-1] == 20 and va2["lengths"].tolist() == [20, 20]


def test_tokenize_missing_audio(tmp_path, codec):
    m = tmp_path / "m.jsonl"
    m.write_text(
        json.dumps(
            {
                "id": "a",
                "path": "nope.wav",
                "caption": "x",
                "split": "train",
                "piece": "p",
                "duration": 1.0,
                "sample_rate": SR,
            }
        )
        + "\n"
    )
    with pytest.raises(FileNotFoundError, match="nope.wav"):
        tokenize_manifest(m, codec, tmp_path / "t", progress=False)


def test_tokenize_cli(dataset, tmp_path, capsys):
    rc = tokenize_main(
        [
            str(dataset),
            "--codec",
            "melrvq",
            "--out",
            str(tmp_path / "tok"),
            "--n-codebooks",
            "2",
            "--set",
            "cardinality=16",
            "--set",
            "kmeans_iters=10",
            "--quiet",
        ]
    )
    assert rc == 0
    out = tmp_path / "tok" / capsys.readouterr().out.strip().rsplit("/", 1)[-1]
    d = torch.load(out / "tokens_train.pt", weights_only=True)
    assert d["codes"].shape[:2] == (10, 2) and int(d["codes"].max()) < 16
    assert list((tmp_path / "tok").glob("melrvq-seed0-*.codec"))
    with pytest.raises(ValueError, match="KEY=VALUE"):
        tokenize_main([str(dataset), "--set", "cardinality"])


# ----------------------------------------------------------------------------- EnCodec / DAC adapters


@pytest.fixture(scope="module")
def encodec_dir(tmp_path_factory):
    from transformers import EncodecConfig, EncodecModel

    torch.manual_seed(0)
    cfg = EncodecConfig(
        sampling_rate=8000,
        hidden_size=16,
        num_filters=4,
        upsampling_ratios=[4, 4],
        codebook_size=64,
        target_bandwidths=[3.0, 6.0, 12.0],
        num_lstm_layers=1,
    )
    d = tmp_path_factory.mktemp("encodec")
    EncodecModel(cfg).save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def dac_dir(tmp_path_factory):
    from transformers import DacConfig, DacModel

    torch.manual_seed(0)
    cfg = DacConfig(
        encoder_hidden_size=4,
        downsampling_ratios=[2, 4],
        decoder_hidden_size=16,
        n_codebooks=3,
        codebook_size=32,
        codebook_dim=4,
        sampling_rate=8000,
    )
    d = tmp_path_factory.mktemp("dac")
    DacModel(cfg).save_pretrained(d)
    return d


def test_encodec_adapter(encodec_dir):
    c = build_codec("encodec", path=str(encodec_dir), n_codebooks=3)
    assert (c.sample_rate, c.channels, c.cardinality, c.n_codebooks) == (8000, 1, 64, 3)
    assert c.frame_rate == 500.0 and c.latent_dim == 16
    x = torch.randn(2, 1, 803) * 0.1
    codes = c.encode(x)
    assert codes.shape == (2, 3, c.n_frames(803)) == (2, 3, 51)
    assert codes.dtype == torch.int64 and 0 <= int(codes.min()) and int(codes.max()) < 64
    y = c.decode(codes)
    assert y.shape == (2, 1, 51 * 16)
    assert torch.allclose(c.decode_latent(c.latent(codes)), y)
    # fewer codebooks = a prefix of the residual codes (picked through the bandwidth)
    c1 = build_codec("encodec", path=str(encodec_dir), n_codebooks=1)
    assert torch.equal(c1.encode(x), codes[:, :1])
    assert c1.identity_hash() != c.identity_hash()
    # the model's default: the smallest bandwidth (3 kbps = 1 codebook here)
    assert load_codec(encodec_dir).n_codebooks == 1
    # input at another rate is resampled
    assert c.encode(torch.randn(1, 1, 1600) * 0.1, sample_rate=16000).shape[-1] == 50
    with pytest.raises(ValueError, match="n_codebooks must be in"):
        build_codec("encodec", path=str(encodec_dir), n_codebooks=5)


def test_encodec_rejects_chunked_models(tmp_path):
    from transformers import EncodecConfig, EncodecModel

    cfg = EncodecConfig(
        sampling_rate=8000,
        hidden_size=16,
        num_filters=4,
        upsampling_ratios=[4, 4],
        codebook_size=64,
        target_bandwidths=[3.0],
        num_lstm_layers=1,
        chunk_length_s=0.1,
        overlap=0.01,
        normalize=True,
    )
    EncodecModel(cfg).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="chunked"):
        build_codec("encodec", path=str(tmp_path))


def test_dac_adapter(dac_dir):
    c = load_codec(f"dac:{dac_dir}")
    assert (c.sample_rate, c.channels, c.cardinality, c.n_codebooks) == (8000, 1, 32, 3)
    assert c.frame_rate == 1000.0 and c.latent_dim == 16
    x = torch.randn(2, 1, 803) * 0.1
    codes = c.encode(x)
    assert codes.shape == (2, 3, c.n_frames(803)) == (2, 3, 101)
    assert 0 <= int(codes.min()) and int(codes.max()) < 32
    y = c.decode(codes)
    assert y.shape == (2, 1, 101 * 8)
    assert torch.allclose(c.decode_latent(c.latent(codes)), y)
    c2 = build_codec("dac", path=str(dac_dir), n_codebooks=2)
    assert torch.equal(c2.encode(x), codes[:, :2])
    assert c2.decode_first_k(codes[:, :1]).shape == y.shape
    # stereo input is mixed to mono
    assert torch.equal(c.encode(torch.cat([x[:1], x[:1]], 1)), codes[:1])
    assert load_codec(dac_dir).identity() == c.identity()


def test_pretrained_missing(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="not-there"):
        build_codec("dac", path=str(tmp_path / "not-there"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="HF_HUB_OFFLINE"):
        build_codec("encodec", path="no-such-org/no-such-codec")
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match="not a supported codec"):
        load_codec(tmp_path / "cfg")
