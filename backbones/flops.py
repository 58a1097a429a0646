"""Analytic FLOPs per token for a backbone (what `torch.utils.flop_counter` would count
for matmuls, plus what it cannot see: attention over the context and SSM scans)."""

from __future__ import annotations

from torch import nn


def matmul_params(module: nn.Module) -> int:
    """Weights that are multiplied by every token (Linear, Conv1d)."""
    n = 0
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv1d)):
            n += m.weight.numel()
    return n


def backbone_flops_per_token(backbone, seq_len: int, memory_len: int = 0, mode: str = "train") -> int:
    """FLOPs per token. mode="train": forward + backward (3x forward), averaged over a
    causal sequence of `seq_len`; mode="decode": one forward step at position `seq_len`."""
    if mode not in ("train", "decode"):
        raise ValueError(f"mode must be 'train' or 'decode', got {mode!r}")
    d = backbone.d_model
    fwd = 2 * matmul_params(backbone)
    ctx = seq_len / 2 if mode == "train" else seq_len  # mean causal context
    for blk in backbone.blocks:
        fwd += blk.mixer.context_flops_per_token(ctx)  # attention: QK^T and AV
        if blk.cross is not None:
            fwd += 4 * d * memory_len
            if mode == "decode":  # memory K/V are cached: their projection is not per token
                fwd -= 2 * blk.cross.kv.weight.numel()
        fwd += blk.mixer.scan_flops_per_token(seq_len)
    return int(3 * fwd if mode == "train" else fwd)
