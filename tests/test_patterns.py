import pytest
import torch

from ttm.patterns import Pattern


def test_delay_layout_by_hand():
    p = Pattern("delay", n_codebooks=3, cardinality=9)
    codes = torch.tensor([[[1, 2, 3, 4], [5, 6, 7, 8], [0, 1, 2, 3]]])  # [1, 3, 4]
    seq = p.build(codes)
    S = 9  # special
    expected = torch.tensor([[[1, 2, 3, 4, S, S], [S, 5, 6, 7, 8, S], [S, S, 0, 1, 2, 3]]])
    assert torch.equal(seq, expected)
    assert torch.equal(p.revert(seq), codes)


@pytest.mark.parametrize("kind", ["delay", "parallel", "first_k"])
def test_round_trip_and_valid_mask(kind):
    p = Pattern(kind, n_codebooks=4, cardinality=16, k=2)
    codes = torch.randint(0, 16, (3, 4, 11))
    seq = p.build(codes)
    assert seq.shape == (3, p.n_out, p.seq_len(11))
    assert torch.equal(p.revert(seq), codes[:, : p.n_out])
    valid = p.valid_mask(torch.tensor([11, 11, 11]), seq.shape[-1])
    assert torch.equal(valid, seq != p.special)  # valid exactly where a real code sits


def test_valid_mask_respects_lengths():
    p = Pattern("delay", n_codebooks=2, cardinality=4)
    v = p.valid_mask(torch.tensor([3, 1]), p.seq_len(3))
    assert v[0].tolist() == [[True, True, True, False], [False, True, True, True]]
    assert v[1].tolist() == [[True, False, False, False], [False, True, False, False]]


def test_bad_pattern_names_field():
    with pytest.raises(ValueError, match="model.pattern"):
        Pattern("zigzag", 4, 16)
    with pytest.raises(ValueError, match="model.first_k"):
        Pattern("first_k", 4, 16, k=5)
