"""flash-linear-attention (`fla`) token mixers as backbones: `fla:GatedDeltaNet`, `fla:GLA`, ...

One adapter turns an fla layer (`fla.layers.<Class>`) into a `Mixer`:

    forward(x, state)   -> layer(x, past_key_values=cache, use_cache=state is not None)
    step(x, state)      -> on CPU (kernel "auto", float32, no autograd) the layer's fused step (`_STEPS`:
                           one row product for its projections, its short convolutions and recurrence
                           as one numba pass, its norm as another); else layer(x) as above; both keep
                           their states in fla's own Cache

Paths (the `kernel` knob, see backbones.ops.dispatch): "kernel" runs the layer as fla
ships it (Triton kernels: CUDA, or CPU tensors under TRITON_INTERPRET=1); "reference"
runs the same layer and parameters with its Triton calls swapped for PyTorch while the
call runs: the recurrences by `linear_recurrence` below (one loop over time, written from
the papers' recurrences; a decoding step's one token as one numba pass where it can,
`fused_cpu.recurrence_step`, recorded under "step"), the gates by fla's own naive
references (`naive_kda_gate`), the short convolution and the norms by `F.conv1d` (a
decoding step's one token: `fused_cpu.short_conv_step`) / `F.rms_norm`. "auto" = kernel on CUDA.

fla is an optional extra (`pip install .[fla]`, see pyproject). Names are registered when
fla imports; `unavailable()` says why a catalogue entry or fla layer is not offered.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from backbones.base import Backbone, Mixer, State, register, step_linear, step_product, while_unchanged
from backbones.ops import fused_cpu
from backbones.ops.dispatch import KernelSwitch, check_mode, kernel_available, load_kernel

# ----------------------------------------------------------------------------- reference recurrence


def linear_recurrence(q, k, v, *, g=None, gk=None, beta=None, scale=None, initial_state=None,
                      output_final_state=False, l2norm_qk=False, state_v_first=False):
    """The gated (delta-rule) linear-attention recurrence, one token at a time, in float32.

    q, k [B, T, Hk, K]; v [B, T, H, V] (H a multiple of Hk); g [B, T, H] (log decay per head)
    or gk [B, T, H, K] (log decay per key channel); beta [B, T, H] (delta rule) or None.

        S_t = diag(exp(gk_t)) S_{t-1}     (or exp(g_t) S_{t-1})      # S [K, V] per head
        S_t = S_t + beta_t k_t (v_t - S_t^T k_t)^T   (delta rule)   or   S_t + k_t v_t^T
        o_t = S_t^T q_t * scale                         (scale default K^-1/2)

    Covers GLA, HGRN2 (gk), SimpleGLA (g), DeltaNet (beta), GatedDeltaNet (g, beta), KDA (gk,
    beta). Returns o [B, T, H, V] in v's dtype and the final state [B, H, K, V] ([B, H, V, K]
    when state_v_first) or None.
    """
    B, T, Hk, K = q.shape
    H, V = v.shape[2], v.shape[3]
    ct = torch.promote_types(v.dtype, torch.float32)
    q, k = (t.to(ct).repeat_interleave(H // Hk, dim=2) for t in (q, k))
    if l2norm_qk:
        q, k = F.normalize(q, dim=-1, eps=1e-6), F.normalize(k, dim=-1, eps=1e-6)
    q = q * (K**-0.5 if scale is None else scale)
    vv = v.to(ct)
    S = q.new_zeros(B, H, K, V) if initial_state is None else initial_state.to(ct)
    if initial_state is not None and state_v_first:
        S = S.transpose(-1, -2)
    outs = []
    for t in range(T):
        if gk is not None:
            S = S * torch.exp(gk[:, t].to(ct))[..., None]
        if g is not None:
            S = S * torch.exp(g[:, t].to(ct))[..., None, None]
        kt, vt = k[:, t], vv[:, t]  # [B, H, K], [B, H, V]
        if beta is not None:
            vt = beta[:, t].to(ct)[..., None] * (vt - (S * kt[..., None]).sum(-2))
        S = S + kt[..., None] * vt[..., None, :]
        outs.append((S * q[:, t, :, :, None]).sum(-2))  # [B, H, V]
    o = torch.stack(outs, 1).to(v.dtype)
    final = (S.transpose(-1, -2) if state_v_first else S) if output_final_state else None
    return o, final


def _recurrence(q, k, v, *, g=None, gk=None, beta=None, scale=None, initial_state=None,
                output_final_state=False, l2norm_qk=False, state_v_first=False):
    """`linear_recurrence`; one token from a state (a decoding step) where `_recurrence_fused` allows
    runs as one numba pass instead (`fused_cpu.recurrence_step`, equal to float32 rounding)."""
    if q.shape[1] != 1 or not _recurrence_fused(v, initial_state, q, k, g, gk, beta):
        return linear_recurrence(q, k, v, g=g, gk=gk, beta=beta, scale=scale, initial_state=initial_state,
                                 output_final_state=output_final_state, l2norm_qk=l2norm_qk,
                                 state_v_first=state_v_first)
    S = initial_state.transpose(-1, -2).contiguous() if state_v_first else initial_state.clone()  # [B,H,K,V]
    o = fused_cpu.recurrence_step(q[:, 0], k[:, 0], v[:, 0], S, None if g is None else g[:, 0],
                                  None if gk is None else gk[:, 0], None if beta is None else beta[:, 0],
                                  scale, l2norm_qk)
    final = (S.transpose(-1, -2) if state_v_first else S) if output_final_state else None
    return o[:, None].to(v.dtype), final


def _recurrence_fused(v: Tensor, state: Tensor | None, *others: Tensor | None) -> bool:
    """Whether a one-token recurrence step runs as `fused_cpu.recurrence_step`: a float32 state to start
    from and `fused_cpu.step_usable` (no autograd recording, float32 CPU, numba) for every tensor."""
    return (state is not None and fused_cpu.step_usable(v, state)
            and all(t is None or t.dtype == torch.float32 for t in others))


def _no(flag: str, value: Any, op: str) -> None:
    if value:
        raise NotImplementedError(f"fla adapter: the PyTorch path of {op} does not implement {flag}={value!r}")


def _common(kw: dict, op: str) -> dict:
    for f in ("cu_seqlens", "cu_seqlens_cpu", "cp_context", "reverse", "gv", "return_intermediate_states"):
        _no(f, kw.pop(f, None), op)
    kw.pop("chunk_indices", None)
    return dict(scale=kw.pop("scale", None), initial_state=kw.pop("initial_state", None),
                output_final_state=kw.pop("output_final_state", False), state_v_first=kw.pop("state_v_first", False))


def _beta(beta, kw, op):
    if kw.pop("use_beta_sigmoid_in_kernel", False):
        beta = beta.sigmoid()
    if kw.pop("allow_neg_eigval", False):
        beta = beta * 2
    return beta


def ref_gla(q, k, v, g=None, gk=None, **kw):
    c = _common(kw, "gla")
    return _recurrence(q, k, v, gk=g if gk is None else gk, **c)


def ref_simple_gla(q, k, v, g=None, g_gamma=None, **kw):
    c = _common(kw, "simple_gla")
    if g is None and g_gamma is not None:
        g = g_gamma.view(1, 1, -1).expand(q.shape[0], q.shape[1], -1)
    return _recurrence(q, k, v, g=g, **c)


def ref_delta_rule(q, k, v, beta=None, **kw):
    c = _common(kw, "delta_rule")
    l2 = kw.pop("use_qk_l2norm_in_kernel", False)
    if beta is None:
        beta = torch.ones(v.shape[:3], dtype=v.dtype, device=v.device)
    return _recurrence(q, k, v, beta=beta, l2norm_qk=l2, **c)


def ref_gated_delta_rule(q, k, v, g=None, beta=None, gk=None, A_log=None, dt_bias=None, **kw):
    from fla.ops.gated_delta_rule.gate import naive_gdn_gate  # fla's own torch reference

    c = _common(kw, "gated_delta_rule")
    if kw.pop("use_gate_in_kernel", False):
        g = naive_gdn_gate(g, A_log, dt_bias)
    l2 = kw.pop("use_qk_l2norm_in_kernel", False)
    beta = _beta(beta, kw, "gated_delta_rule")
    return _recurrence(q, k, v, g=g, gk=gk, beta=beta, l2norm_qk=l2, **c)


def ref_kda(q, k, v, g, beta, A_log=None, dt_bias=None, **kw):
    from fla.ops.kda.gate import naive_kda_gate, naive_kda_lowerbound_gate  # fla's own torch references

    c = _common(kw, "kda")
    l2 = kw.pop("use_qk_l2norm_in_kernel", False)
    lower = kw.pop("lower_bound", None)
    kw.pop("safe_gate", None), kw.pop("disable_recompute", None), kw.pop("use_graph", None), kw.pop("max_num_seqs", None)
    if kw.pop("use_gate_in_kernel", False):
        g = (naive_kda_gate(g, A_log, dt_bias) if lower is None
             else naive_kda_lowerbound_gate(g, A_log, dt_bias, lower_bound=lower))
    beta = _beta(beta, kw, "kda")
    return _recurrence(q, k, v, gk=g, beta=beta, l2norm_qk=l2, **c)


# fla op (module path, name) -> PyTorch reference with the same call signature
_OP_REFS = {
    ("fla.ops.gla", "chunk_gla"): ref_gla,
    ("fla.ops.gla", "fused_chunk_gla"): ref_gla,
    ("fla.ops.gla", "fused_recurrent_gla"): ref_gla,
    ("fla.ops.simple_gla", "chunk_simple_gla"): ref_simple_gla,
    ("fla.ops.simple_gla", "fused_recurrent_simple_gla"): ref_simple_gla,
    ("fla.ops.delta_rule", "chunk_delta_rule"): ref_delta_rule,
    ("fla.ops.delta_rule", "fused_recurrent_delta_rule"): ref_delta_rule,
    ("fla.ops.gated_delta_rule", "chunk_gated_delta_rule"): ref_gated_delta_rule,
    ("fla.ops.gated_delta_rule", "fused_recurrent_gated_delta_rule"): ref_gated_delta_rule,
    ("fla.ops.kda", "chunk_kda"): ref_kda,
    ("fla.ops.kda", "fused_recurrent_kda"): ref_kda,
    ("fla.modules.convolution", "causal_conv1d"): lambda *a, **kw: ref_causal_conv1d(*a, **kw),
    ("fla.modules.activations", "swish"): F.silu,
    ("fla.modules.layernorm", "rms_norm_linear"): lambda x, nw, nb, lw, lb, residual=None, eps=1e-5, **kw: (
        _no("residual", residual is not None, "rms_norm_linear")
        or F.linear(F.rms_norm(x, (x.shape[-1],), nw, eps) + (0 if nb is None else nb), lw, lb)),
}


# ----------------------------------------------------------------------------- reference modules


def ref_causal_conv1d(x, weight, bias=None, residual=None, initial_state=None, output_final_state=False,
                      activation=None, cu_seqlens=None, **kw):
    """fla's causal_conv1d in PyTorch: x [B, T, D], weight [D, W]; state [B, D, W] = the last W inputs."""
    _no("cu_seqlens", cu_seqlens, "causal_conv1d")
    B, _, D = x.shape  # [B, T, D]
    W = weight.shape[-1]
    left = x.new_zeros(B, D, W - 1) if initial_state is None else initial_state[..., 1:].to(x.dtype)
    xt = torch.cat([left, x.transpose(1, 2)], -1)  # [B, D, W - 1 + T]
    y = F.conv1d(xt, weight[:, None], bias, groups=D).transpose(1, 2)
    if activation in ("silu", "swish"):
        y = F.silu(y)
    if residual is not None:
        y = y + residual
    final = xt[..., -W:] if output_final_state else None
    return y, final


def _short_conv_ref(self, x, residual=None, mask=None, cache=None, output_final_state=False, cu_seqlens=None, **kw):
    """fla ShortConvolution in PyTorch; when decoding, its cache [B, D, W] is updated in place and is the
    final state it returns, and one token runs as one numba pass where `_conv_step_fused` allows."""
    if mask is not None:
        x = x * mask[..., None]
    decoding = cache is not None and not torch.is_grad_enabled()
    if decoding and x.shape[1] == 1 and residual is None and _conv_step_fused(self, x, cache):
        silu = self.activation is not None
        y = fused_cpu.short_conv_step(x[:, 0], cache, self.weight[:, 0], self.bias, silu)
        return y[:, None], cache
    y, final = ref_causal_conv1d(x, self.weight[:, 0], self.bias, residual, cache,
                                 output_final_state or cache is not None, self.activation, cu_seqlens)
    if decoding:
        cache.copy_(final)
        final = cache  # the same values, in the cache's own (contiguous) tensor
    return y, final


def _conv_step_fused(conv, x: Tensor, cache: Tensor) -> bool:
    """Whether a ShortConvolution's one-token step runs as `fused_cpu.short_conv_step`: its activation
    is silu or none, a contiguous float32 cache and `fused_cpu.step_usable` for x."""
    return (conv.activation in (None, "silu", "swish") and cache.is_contiguous()
            and conv.weight.dtype == torch.float32 and fused_cpu.step_usable(x, cache))


def _rms_norm_gated_ref(self, x, g, residual=None, prenorm=False, residual_in_fp32=False):
    _no("residual", residual is not None, "FusedRMSNormGated")
    y = F.rms_norm(x.float(), (x.shape[-1],), None, self.eps)
    if self.weight is not None:
        y = y * self.weight.float()
    if getattr(self, "bias", None) is not None:
        y = y + self.bias.float()
    gate = torch.sigmoid(g.float()) if self.activation == "sigmoid" else F.silu(g.float())
    return (y * gate).to(x.dtype)


def _rms_norm_ref(self, x, residual=None, prenorm=False, residual_in_fp32=False):
    _no("residual", residual is not None, "RMSNorm")
    y = F.rms_norm(x.float(), (x.shape[-1],), None, self.eps)
    if self.weight is not None:
        y = y * self.weight.float()
    if self.bias is not None:
        y = y + self.bias.float()
    return y.to(x.dtype)


_MODULE_REFS = {  # fla module class (module path, name) -> PyTorch forward
    ("fla.modules", "ShortConvolution"): _short_conv_ref,
    ("fla.modules", "FusedRMSNormGated"): _rms_norm_gated_ref,
    ("fla.modules", "RMSNorm"): _rms_norm_ref,
}


@contextlib.contextmanager
def torch_path(layer: torch.nn.Module):
    """While inside, `layer` computes with PyTorch only: fla ops named in its module are
    swapped for their references and fla norm/conv submodules get PyTorch forwards.
    Raises NotImplementedError naming an fla op or module that has no reference."""
    mod = importlib.import_module(type(layer).__module__)
    ops, classes = _refs()
    saved = {name: obj for name, obj in vars(mod).items() if id(obj) in ops}
    patched = []
    try:
        for name, obj in saved.items():
            setattr(mod, name, ops[id(obj)])
        for sub in layer.modules():
            fwd = classes.get(type(sub))
            if fwd is not None:
                sub.forward = fwd.__get__(sub)
                patched.append(sub)
        yield
    finally:
        for name, obj in saved.items():
            setattr(mod, name, obj)
        for sub in patched:
            del sub.forward


@functools.cache
def _refs() -> tuple[dict, dict]:
    """(id of each fla op that imports -> its reference, fla module class -> its PyTorch forward),
    looked up once per process (a decoding step enters `torch_path` once per layer)."""
    ops = {id(load_kernel(m, n)): ref for (m, n), ref in _OP_REFS.items() if kernel_available(m, n)}
    classes = {load_kernel(m, n): fwd for (m, n), fwd in _MODULE_REFS.items() if kernel_available(m, n)}
    return ops, classes


# ----------------------------------------------------------------------------- fused decoding steps
# One token of a catalogue layer, written from its forward (fla 0.6.0) for a decoding step: the projections
# that read the input as one row product (`step_product` on their weights concatenated while unchanged),
# the short convolutions, the recurrence and the norm as numba passes, the gates in torch.
# fla's forward runs ~60 small ops per token (a step cost 0.5-1.6 ms a layer); this runs ~10.
# `FlaMixer.step` takes it where `_STEPS` has the layer and its check passes; else the forward runs.


def _consts(mixer, mods) -> tuple:
    """What a fused step reads besides x and the state, kept while the mixer's parameters are unchanged:
    the nn.Linear `mods` (each reading x) as one weight and bias, their widths, and the three short
    convolutions' weights [C, W] and biases concatenated (None without short convolutions)."""
    def build():
        W = torch.cat([m.weight for m in mods]).detach()
        b = None if all(m.bias is None for m in mods) else torch.cat(
            [m.weight.new_zeros(m.out_features) if m.bias is None else m.bias for m in mods]).detach()
        L = mixer.layer
        convs = (L.q_conv1d, L.k_conv1d, L.v_conv1d) if getattr(L, "use_short_conv", False) else ()
        cw = torch.cat([cv.weight[:, 0] for cv in convs]).detach() if convs else None
        cb = torch.cat([cv.bias for cv in convs]).detach() if convs and convs[0].bias is not None else None
        return W, b, [m.out_features for m in mods], cw, cb, tuple(cv.activation is not None for cv in convs)
    return while_unchanged(mixer, "_step_consts", None, build)


def _rows(cs: tuple, x: Tensor) -> tuple[Tensor, list[Tensor]]:
    """x [B, D] through the projections of `_consts` cs as one row product -> ([B, sum of widths], its parts)."""
    proj = step_product(x, cs[0], cs[1])
    return proj, list(proj.split(cs[2], -1))


def _conv_recurrence(cs: tuple, proj: Tensor, c: dict, v_first: bool, **kw) -> Tensor:
    """q, k, v (proj's first columns) through the layer's three short convolutions (their weights in `_consts`
    cs) and its recurrence (kw: g, gk, beta, l2norm_qk), one numba pass (`fused_cpu.conv_recurrence_step`)
    -> o [B, H, V]."""
    return fused_cpu.conv_recurrence_step(proj, c["conv_state"], cs[3], cs[4], cs[5], _state_kv(c, v_first), **kw)


def _state_kv(c: dict, v_first: bool) -> Tensor:
    """The layer's recurrent state as a contiguous [B, H, K, V] tensor that a step updates in place; a
    V-first state ([B, H, V, K]) is kept in the cache as that tensor's transposed view (what the
    reference path's prefill leaves; a contiguous V-first state is laid out so once)."""
    s = c["recurrent_state"]
    kv = s.transpose(-1, -2) if v_first else s
    if not kv.is_contiguous():
        kv = kv.contiguous()
        c["recurrent_state"] = kv.transpose(-1, -2) if v_first else kv
    return kv


def _heads(t: Tensor, d: int) -> Tensor:  # [B, H * d] -> [B, H, d]
    return t.reshape(t.shape[0], -1, d)


def _gated_norm(norm, o: Tensor, gate: Tensor | None) -> Tensor:
    """The output norm per head (fla's RMSNorm, or FusedRMSNormGated with gate [B, H * V]) on o [B, H, V]
    -> [B, H * V]: one numba pass (`fused_cpu.gated_rms_rows`), or the reference without a weight."""
    if norm.weight is None:
        y = _rms_norm_ref(norm, o) if gate is None else _rms_norm_gated_ref(norm, o, gate.view(o.shape))
    else:
        rows = o.reshape(-1, o.shape[-1])
        y = fused_cpu.gated_rms_rows(rows, norm.weight, getattr(norm, "bias", None), norm.eps,
                                     None if gate is None else gate.reshape(rows.shape),
                                     getattr(norm, "activation", "silu"))
    return y.reshape(o.shape[0], -1)


def _beta_of(layer, b: Tensor) -> Tensor:
    return b.sigmoid() * 2 if layer.allow_neg_eigval else b.sigmoid()


def _step_delta_net(m, x, c):
    L = m.layer
    cs = _consts(m, [L.q_proj, L.k_proj, L.v_proj, L.b_proj] + ([L.g_proj] if L.use_gate else []))
    proj, (_, _, _, b, *g) = _rows(cs, x)
    o = _conv_recurrence(cs, proj, c, False, beta=_beta_of(L, b), l2norm_qk=True)
    return step_linear(L.o_proj, _gated_norm(L.o_norm, o, g[0] if g else None))


def _step_gated_delta_net(m, x, c):
    L = m.layer
    cs = _consts(m, [L.q_proj, L.k_proj, L.v_proj, L.a_proj, L.b_proj] + ([L.g_proj] if L.use_gate else []))
    proj, (_, _, _, a, b, *g) = _rows(cs, x)
    decay = -L.A_log.exp() * F.softplus(a + L.dt_bias)  # [B, Hv]: fla's naive_gdn_gate
    o = _conv_recurrence(cs, proj, c, True, g=decay, beta=_beta_of(L, b), l2norm_qk=True)
    return step_linear(L.o_proj, _gated_norm(L.o_norm, o, g[0] if g else None))


def _step_kda(m, x, c):
    L = m.layer
    cs = _consts(m, [L.q_proj, L.k_proj, L.v_proj, L.f_proj[0], L.b_proj, L.g_proj[0]])
    proj, (_, _, _, f, b, g) = _rows(cs, x)
    f = _heads(step_linear(L.f_proj[1], f), L.head_k_dim)  # [B, Hv, K]
    decay = -L.A_log.exp()[:, None] * F.softplus(f + L.dt_bias.view(f.shape[1:]))  # fla's naive_kda_gate
    o = _conv_recurrence(cs, proj, c, True, gk=decay, beta=_beta_of(L, b), l2norm_qk=True)
    return step_linear(L.o_proj, _gated_norm(L.o_norm, o, step_linear(L.g_proj[1], g)))


def _gla_out(L, o: Tensor, g: Tensor | None) -> Tensor:
    """GLA's and SimpleGLA's output: the norm with its swish gate fused (or, without a gate, the norm), o_proj.
    (Their unfused `gate_fn` is an fla Triton op held by the layer, which no path here replaces.)"""
    y = _gated_norm(L.g_norm, o, None) if g is None else _gated_norm(L.g_norm_swish_gate, o, g)
    return step_linear(L.o_proj, y)


def _step_simple_gla(m, x, c):
    L = m.layer
    cs = _consts(m, [L.q_proj, L.k_proj, L.v_proj, L.g_proj, L.gk_proj])
    proj, (q, k, v, g, gk) = _rows(cs, x)
    decay = F.logsigmoid(gk) / L.gate_logit_normalizer  # [B, H]
    if L.use_short_conv:
        o = _conv_recurrence(cs, proj, c, True, g=decay)
    else:
        o = fused_cpu.recurrence_step(_heads(q, L.head_k_dim), _heads(k, L.head_k_dim), _heads(v, L.head_v_dim),
                                      _state_kv(c, True), g=decay)
    return _gla_out(L, o, g)


def _step_gla(m, x, c):
    L = m.layer
    cs = _consts(m, [L.q_proj, L.k_proj, L.v_proj, L.gk_proj[0]] + ([L.g_proj] if L.use_output_gate else []))
    proj, (q, k, v, gk, *g) = _rows(cs, x)
    gk = F.logsigmoid(step_linear(L.gk_proj[1], gk)) / L.gate_logit_normalizer
    if L.clamp_min is not None:
        gk = torch.clamp_min(gk, L.clamp_min)
    gk = _heads(gk, L.head_k_dim)  # [B, H, K]
    if L.use_short_conv:
        o = _conv_recurrence(cs, proj, c, True, gk=gk)
    else:
        o = fused_cpu.recurrence_step(_heads(q, L.head_k_dim), _heads(k, L.head_k_dim), _heads(v, L.head_v_dim),
                                      _state_kv(c, True), gk=gk)
    return _gla_out(L, o, g[0] if g else None)


def _step_hgrn2(m, x, c):
    L = m.layer
    _, (q, f, i) = _rows(_consts(m, [L.q_proj, L.f_proj, L.i_proj]), x)
    g = F.logsigmoid(f)
    o = fused_cpu.recurrence_step(_heads(F.silu(q), L.head_f_dim), _heads(1 - g.exp(), L.head_f_dim),
                                  _heads(i, L.head_i_dim), _state_kv(c, True), gk=_heads(g, L.head_f_dim))
    return _OP_REFS[("fla.modules.layernorm", "rms_norm_linear")](o.reshape(o.shape[0], -1), L.g_norm.weight,
                                                                  L.g_norm.bias, L.o_proj.weight, L.o_proj.bias)


#: catalogue layer -> (its fused step: (mixer, x [B, D], cache entry) -> [B, D],
#: whether the layer's configuration is the one the step is written for)
_STEPS: dict[str, tuple[Any, Any]] = {
    "DeltaNet": (_step_delta_net, lambda L: L.use_short_conv and L.use_beta and L.qk_activation == "silu"
                 and L.qk_norm == "l2"),
    "GatedDeltaNet": (_step_gated_delta_net, lambda L: L.use_short_conv),
    "KDA": (_step_kda, lambda L: L.use_short_conv and L.lower_bound is None),
    "SimpleGLA": (_step_simple_gla, lambda L: L.feature_map_fn is None and L.num_kv_groups == 1
                  and L.fuse_norm_and_gate),
    "GLA": (_step_gla, lambda L: L.feature_map_fn is None and L.num_kv_groups == 1
            and (L.fuse_norm_and_gate or not L.use_output_gate)),
    "HGRN2": (_step_hgrn2, lambda L: not L.use_short_conv),
}


# ----------------------------------------------------------------------------- catalogue

#: fla layer -> (class in fla.layers[.module], constructor kwargs given d_model D and heads H)
CATALOGUE: dict[str, tuple[str, Any]] = {
    "GatedDeltaNet": ("GatedDeltaNet", lambda D, H: dict(head_dim=D // H, expand_v=1, num_heads=H)),
    "GLA": ("GatedLinearAttention", lambda D, H: dict(expand_k=0.5, expand_v=1.0, num_heads=H)),
    "HGRN2": ("HGRN2Attention", lambda D, H: dict(num_heads=H, expand_ratio=D // H)),
    "DeltaNet": ("DeltaNet", lambda D, H: dict(num_heads=H)),
    "KDA": ("KimiDeltaAttention", lambda D, H: dict(head_dim=D // H, expand_v=1, num_heads=H)),
    "SimpleGLA": ("simple_gla.SimpleGatedLinearAttention", lambda D, H: dict(num_heads=H)),
}
#: layers of fla.layers not in the catalogue, with the reason
NOT_ADAPTED = {
    "RWKV7Attention": "its ops (chunk_rwkv7, fused_addcmul_rwkv7, fused_k_rwkv7, token_shift, GroupNorm) "
                      "have no PyTorch path in the adapter yet",
    "RWKV6Attention": "chunk_rwkv6 and its LoRA/token-shift kernels have no PyTorch path in the adapter yet",
    "MultiScaleRetention": "its RotaryEmbedding and retention ops have no PyTorch path in the adapter yet",
    "HGRNAttention": "chunk_hgrn has no PyTorch path in the adapter yet",
    "LinearAttention": "its feature maps and chunk_linear_attn normalisation have no PyTorch path yet",
    "Mamba2": "the suite's own `mamba2` backbone covers it",
    "Mamba3": "the suite's own `mamba3` backbone covers it",
}


def fla_missing() -> str | None:
    """Why fla cannot be used here, or None. Looks for the files without importing fla (its import
    takes seconds and loads Triton), so registering the catalogue costs nothing."""
    hint = "is not installed (pip install --no-deps {}, or pip install .[fla])"
    spec = importlib.util.find_spec("fla")
    if spec is None:
        return "fla " + hint.format("fla-core==0.6.0")
    if not any((Path(d) / "layers").is_dir() for d in (spec.submodule_search_locations or [])):
        return "fla.layers " + hint.format("flash-linear-attention==0.6.0")
    return None


def unavailable() -> dict[str, str]:
    """{fla layer: why it is not a backbone here}."""
    missing = fla_missing()
    if missing is not None:
        return {f"fla:{name}": missing for name in CATALOGUE}
    import fla.layers

    out = {}
    for cls in getattr(fla.layers, "__all__", []):
        if cls in NOT_ADAPTED:
            out[f"fla:{cls}"] = NOT_ADAPTED[cls]
        elif cls not in {c.rsplit(".", 1)[-1] for c, _ in CATALOGUE.values()}:
            out[f"fla:{cls}"] = "not in the adapter's catalogue (no PyTorch path checked for its ops)"
    return out


class FlaMixer(KernelSwitch, Mixer):
    """An fla token-mixing layer as a Mixer. State: {"cache": fla Cache} (its recurrent and
    conv states, allocated up front so the state size is known before decoding)."""

    constant_state = True

    def __init__(self, d_model: int, layer: str, n_heads: int = 4, kernel: str = "auto",
                 layer_kwargs: dict[str, Any] | None = None):
        super().__init__()
        if layer not in CATALOGUE:
            raise ValueError(f"fla: unknown layer {layer!r}; the catalogue has {', '.join(CATALOGUE)}")
        why = fla_missing()
        if why is not None:
            raise RuntimeError(f"fla:{layer}: {why}")
        self.layer_name, self.kernel = layer, check_mode(f"fla:{layer}", kernel)
        cls_name, defaults = CATALOGUE[layer]
        self.cls_path = f"fla.layers.{cls_name}"
        self._where = self.cls_path.rsplit(".", 1)  # (module, class)
        kw = {**defaults(d_model, n_heads), **(layer_kwargs or {})}
        self.layer = load_kernel(*self._where)(hidden_size=d_model, layer_idx=0, **kw)

    def _run(self, x: Tensor, cache) -> Tensor:
        use_kernel = self.kernel == "kernel" or (self.kernel == "auto" and x.is_cuda)
        self.record_path("layer", load_kernel(*self._where) if use_kernel else None, *self._where,
                         f"{self.cls_path} + backbones.fla.torch_path")
        ctx = contextlib.nullcontext() if use_kernel else torch_path(self.layer)
        if cache is not None and x.shape[1] == 1 and not use_kernel:  # a decoding step: `_recurrence`, and
            # `_short_conv_ref` where the layer has short convolutions (the same condition: float32, no grad)
            fused = _recurrence_fused(x, cache[0].get("recurrent_state"))
            path = f"backbones.fla one-token recurrence and short conv{fused_cpu.numba_note(fused)}"
            self.record_path("step", None, "", "", path)
        with ctx:
            out = self.layer(x, past_key_values=cache, use_cache=cache is not None)
        return out[0]

    def forward(self, x: Tensor, state: State | None = None) -> Tensor:
        return self._run(x, None if state is None else state["cache"])

    def step(self, x: Tensor, state: State) -> Tensor:  # [B, D] -> [B, D]
        """One decoding step: the layer's fused step (`_STEPS`) where `_step_fused` allows, else its forward."""
        cache = state["cache"]
        if not self._step_fused(x, cache[0]):
            return super().step(x, state)
        self.record_path("step", None, "", "", f"backbones.fla.FlaMixer.step: fused {self.layer_name} step"
                                               f"{fused_cpu.numba_note(True)}")
        y = _STEPS[self.layer_name][0](self, x, cache[0])
        cache.update(layer_idx=0, offset=1)  # the states were updated in place; count the token
        return y

    def _step_fused(self, x: Tensor, entry: dict) -> bool:
        """Whether a step runs as the layer's fused step: kernel "auto" off CUDA (not "reference": that runs
        the layer's own forward), a step written for this layer and its configuration, float32 CPU rows
        without autograd (`fused_cpu.step_usable`), a float32 state and contiguous float32 conv windows."""
        fn, fits = _STEPS.get(self.layer_name, (None, None))
        windows = entry.get("conv_state") or ()
        return (self.kernel == "auto" and fn is not None and fits(self.layer)
                and fused_cpu.step_usable(x, entry["recurrent_state"], *windows)
                and all(w.is_contiguous() for w in windows))

    def allocate_state(self, batch_size: int, max_len: int, device=None, dtype=None) -> State:
        """An fla Cache holding zero states: the shapes come from one zero token through the
        layer on a throwaway cache (PyTorch path); the new cache has seen no tokens."""
        from fla.models.utils import Cache

        p = next(self.parameters())
        device, dtype = device or p.device, dtype or p.dtype
        probe = Cache()
        with torch.no_grad(), torch_path(self.layer), torch.device(p.device):  # shapes only; may be asked for meta
            self.layer(torch.zeros(batch_size, 1, self.layer.hidden_size, dtype=p.dtype),
                       past_key_values=probe, use_cache=True)
        zeros = {k: _zeros_like(v, device, dtype) for k, v in probe[0].items() if v is not None and k != "attn_state"}
        cache = Cache()
        cache.update(layer_idx=0, offset=0, **zeros)
        return {"cache": cache}

    def state_numel(self, state: State) -> int:
        return sum(t.numel() for t in _tensors(state["cache"][0]))


def _zeros_like(v, device, dtype):
    """Zeros shaped like a cache entry; recurrent states stay in at least float32."""
    if torch.is_tensor(v):
        dt = torch.promote_types(dtype, torch.float32) if v.dtype == torch.float32 else dtype
        return torch.zeros(v.shape, device=device, dtype=dt)
    return type(v)(_zeros_like(t, device, dtype) for t in v)


def _tensors(obj):
    if torch.is_tensor(obj):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)


class FlaBackbone(Backbone):
    """Base of the `fla:<Layer>` backbones (one subclass per catalogue entry)."""

    layer: str = "?"
    default_mlp_ratio = 2.0  # fla's models interleave their mixers with an MLP
    size_knob = ("mlp_ratio", 0.25, 16.0, 0)

    def make_mixer(self, layer_idx: int) -> Mixer:
        unknown = sorted(set(self.mixer_kwargs) - {"kernel", "layer_kwargs"})
        if unknown:
            raise ValueError(f"{self.name}: unknown knob(s) {', '.join(unknown)}; expected kernel, layer_kwargs")
        return FlaMixer(self.d_model, self.layer, n_heads=self.n_heads, **self.mixer_kwargs)

    def scan_flops_per_token(self, seq_len: int) -> int:
        """The recurrence per token: state decay, (delta) update and read-out, ~6 K V per head."""
        n = 0
        for b in self.blocks:
            lay = b.mixer.layer
            H = getattr(lay, "num_v_heads", None) or getattr(lay, "num_heads", 1)
            K = getattr(lay, "head_k_dim", None) or getattr(lay, "head_qk_dim", None) or getattr(lay, "head_dim", 1)
            V = getattr(lay, "head_v_dim", None) or K
            n += 6 * H * int(K) * int(V)
        return n


def _register_catalogue() -> None:
    if fla_missing() is not None:
        return
    for name in CATALOGUE:
        cls = type(f"Fla{name}", (FlaBackbone,), {"layer": name, "__doc__": f"fla.layers {CATALOGUE[name][0]} "
                   f"(flash-linear-attention) as a mixer; knobs: kernel, layer_kwargs.",
                   "__module__": __name__})
        register(f"fla:{name}")(cls)
        globals()[cls.__name__] = cls  # importable by dotted path too


_register_catalogue()

