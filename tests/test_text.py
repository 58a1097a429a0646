"""Text encoders: packaged MiniLM (real weights) and FLAN-T5 on a tiny random model.

The tiny T5 uses a real T5 (Unigram, `</s>`-terminated) tokenizer built in memory from a
small word list, since no T5 tokenizer files are available offline.
"""

from __future__ import annotations

import string

import pytest
import torch

from ttm.text import TextEncoder, build_text_encoder

CAPTIONS = [
    "A slow chorale in F# minor played by a string ensemble.",
    "",
    "A fast piano piece in C major.",
]


@pytest.fixture(scope="module")
def minilm():
    return build_text_encoder("minilm", max_length=32)


def test_minilm_shapes_and_mask(minilm):
    emb, mask = minilm.encode(CAPTIONS)
    n_tok = [len(minilm.tokenizer(c)["input_ids"]) for c in CAPTIONS if c]  # incl. [CLS], [SEP]
    assert minilm.dim == 384
    assert emb.dtype == torch.float32 and mask.dtype == torch.bool
    assert emb.shape == (3, max(n_tok), 384) and mask.shape == (3, max(n_tok))
    assert mask.sum(1).tolist() == [n_tok[0], 0, n_tok[1]]
    # mask is a prefix; masked positions are zero
    for i in range(3):
        n = int(mask[i].sum())
        assert mask[i, :n].all() and not mask[i, n:].any()
        assert (emb[i, n:] == 0).all()
    assert (emb[1] == 0).all()  # the null caption
    assert emb[0, : n_tok[0]].abs().sum(-1).min() > 0


def test_minilm_deterministic_and_discriminative(minilm):
    a, _ = minilm.encode([CAPTIONS[0]])
    minilm._cache.clear()
    b, _ = minilm.encode([CAPTIONS[0], "a much longer caption that forces padding of the first one here"])
    assert torch.allclose(a[0], b[0, : a.shape[1]], atol=1e-5)
    c, _ = minilm.encode(["A slow chorale in F# minor played by a brass ensemble."])
    n = min(a.shape[1], c.shape[1])
    assert (a[0, :n] - c[0, :n]).abs().max() > 1e-2
    assert minilm.identity() == minilm.identity()


def test_minilm_truncation_nulls_and_errors(minilm):
    long = " ".join(["music"] * 100)
    emb, mask = minilm.encode([long, "   "])
    assert mask.sum(1).tolist() == [32, 0]
    emb, mask = minilm.encode(["", ""])
    assert emb.shape == (2, 1, 384) and not mask.any() and (emb == 0).all()
    with pytest.raises(ValueError, match="list of strings"):
        minilm.encode("just a string")
    with pytest.raises(ValueError, match="unknown text encoder"):
        build_text_encoder("clip")


def test_minilm_frozen(minilm):
    assert not any(p.requires_grad for p in minilm.parameters())
    minilm.train()
    assert not minilm.model.training
    assert build_text_encoder("minilm", max_length=16).identity() != minilm.identity()


def test_cache_is_bounded(minilm):
    minilm.cache_size = 2
    try:
        minilm.encode(["one", "two", "three"])
        assert list(minilm._cache) == ["two", "three"]
    finally:
        minilm.cache_size = 1024


@pytest.fixture(scope="module")
def tiny_t5_dir(tmp_path_factory):
    from transformers import T5Config, T5EncoderModel, T5Tokenizer

    words = [
        "a",
        "slow",
        "fast",
        "chorale",
        "in",
        "minor",
        "major",
        "played",
        "by",
        "string",
        "ensemble",
        "piano",
        "piece",
    ]
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -3.0)]
    vocab += [("▁" + w, -1.0) for w in words] + [
        (ch, -5.0) for ch in string.ascii_letters + string.digits + ".,#"
    ]
    tok = T5Tokenizer(vocab=vocab, extra_ids=0)
    torch.manual_seed(0)
    cfg = T5Config(vocab_size=len(tok), d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=2)
    d = tmp_path_factory.mktemp("flan-t5-tiny")
    T5EncoderModel(cfg).save_pretrained(d)
    tok.save_pretrained(d)
    return d


def test_flan_t5_tiny(tiny_t5_dir):
    enc = build_text_encoder("flan-t5", path=str(tiny_t5_dir), max_length=8)
    assert isinstance(enc, TextEncoder) and enc.dim == 16
    emb, mask = enc.encode(CAPTIONS)
    ids = [enc.tokenizer(c, truncation=True, max_length=8)["input_ids"] for c in CAPTIONS]
    assert ids[2][-1] == enc.tokenizer.eos_token_id  # T5-style: ends with </s>
    assert mask.sum(1).tolist() == [len(ids[0]), 0, len(ids[2])] and mask.sum(1).max() <= 8
    assert emb.shape == (3, int(mask.sum(1).max()), 16)
    assert (emb[1] == 0).all()
    assert (emb[0] - emb[2]).abs().max() > 0
    assert enc.identity()["name"] == "flan-t5"


def test_flan_t5_missing_weights(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="no-model-here"):
        build_text_encoder("flan-t5", path=str(tmp_path / "no-model-here"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match=r"no-such-org/flan-t5-missing.*HF_HUB_OFFLINE"):
        build_text_encoder("flan-t5", path="no-such-org/flan-t5-missing")


def test_encode_captions_reports_truncation():
    from ttm.text import encode_captions

    class Enc:
        def encode(self, caps):
            n = max(len(c.split()) for c in caps)
            mask = torch.tensor([[i < len(c.split()) for i in range(n)] for c in caps])
            return torch.ones(len(caps), n, 3), mask

    flags: list[bool] = []
    emb, mask = encode_captions(Enc(), ["one two", "a b c d e f"], 4, truncated=flags)
    assert flags == [False, True] and emb.shape == (2, 4, 3) and mask.sum().item() == 6
