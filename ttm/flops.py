"""FLOP accounting: matmuls counted by `torch.utils.flop_counter` outside the scans, plus each
backbone's analytic scan FLOPs (recurrences, FFT convolutions, chunked SSD), so that a scan is
counted once whether or not the counter can see into it.

A training step costs forward + backward; the backward of the scan is taken as 2x its
forward (the usual 3x rule), the matmul backward is counted exactly.
"""

from __future__ import annotations

import math

import torch
from torch.utils.flop_counter import (
    FlopCounterMode,
    register_flop_formula,
    sdpa_backward_flop_count,
    sdpa_flop_count,
    shape_wrapper,
)

from ttm.lm import TTMLM

# The CPU flash-attention kernels have no formula in torch's counter (CUDA ones do): register
# the same formulas so attention is counted on every device.
_aten = torch.ops.aten
if _aten._scaled_dot_product_flash_attention_for_cpu.default not in torch.utils.flop_counter.flop_registry:

    @register_flop_formula(_aten._scaled_dot_product_flash_attention_for_cpu)
    def _sdpa_cpu(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return sdpa_flop_count(query_shape, key_shape, value_shape)

    @register_flop_formula(_aten._scaled_dot_product_flash_attention_for_cpu_backward)
    def _sdpa_cpu_bwd(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kw) -> int:
        return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


# torch's convolution_backward formula ignores groups: for the depthwise convs of Mamba/Mamba2 it
# counts C times the real work. Each requested gradient costs one forward: 2 * |out| * (C_in/g) * K.
def _conv_bwd(grad_out_shape, x_shape, w_shape, *args, out_shape=None, **kwargs) -> int:
    output_mask = args[-1]
    fwd = 2 * math.prod(grad_out_shape) * math.prod(w_shape[1:])
    return fwd * (int(bool(output_mask[0])) + int(bool(output_mask[1])))


torch.utils.flop_counter.flop_registry[_aten.convolution_backward] = shape_wrapper(_conv_bwd)


def backbone_positions(model: TTMLM, n_frames: int, text_len: int) -> int:
    """Sequence positions the backbone processes per clip."""
    S = model.pattern.seq_len(n_frames)
    return S + (text_len + 1 if model.conditioning == "prefix" else 0)


def count_train_step_flops(model: TTMLM, codes, lengths, text_emb, text_mask) -> dict[str, int]:
    """FLOPs of one forward+backward on this batch, each counted once:

        counted  torch's counter (matmuls, convs, attention) outside the scans, plus what
                 it cannot see outside them (`train_flops_uncounted`: a hand-written conv)
        scan     the scans, analytic (3 x `scan_flops_per_token`); what the counter saw
                 inside them (`scan_flops_counted`: the matmuls of a pure-PyTorch scan,
                 reported as `scan_seen`) is taken out of `counted`
        total    counted + scan

    RNG state and gradients are left as they were.
    """
    had_grad = {n: p.grad for n, p in model.named_parameters()}
    with torch.random.fork_rng(devices=[]), FlopCounterMode(display=False) as fc:
        loss, _ = model.loss(codes, lengths, text_emb, text_mask)
        loss.backward()
    for n, p in model.named_parameters():
        p.grad = had_grad[n]
    counted = int(fc.get_total_flops())
    B, T = codes.shape[0], codes.shape[-1]
    pos = backbone_positions(model, T, text_emb.shape[1])
    bb = model.backbone
    seen = bb.scan_flops_counted(B, pos)
    counted += bb.train_flops_uncounted(B, pos) - seen
    scan = 3 * B * pos * bb.scan_flops_per_token(pos)
    return {"counted": counted, "scan": int(scan), "scan_seen": int(seen), "total": counted + int(scan)}


def analytic_flops_per_token(model: TTMLM, n_frames: int, text_len: int, mode: str = "train") -> int:
    """Analytic FLOPs per backbone position: backbone (matmuls, attention, scans) + output heads."""
    pos = backbone_positions(model, n_frames, text_len)
    mem = text_len + 1 if model.conditioning == "cross" else 0
    bb = model.backbone.flops_per_token(pos, memory_len=mem, mode=mode)
    heads = 2 * sum(h.weight.numel() for h in model.heads)
    return int(bb + (3 if mode == "train" else 1) * heads)
