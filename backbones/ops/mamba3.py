"""Mamba-3 SISO scan (Lahoti, Li, Chen, Wang, Bick, Kolter, Dao, Gu 2026): pure PyTorch.

Per head, with a data-dependent rotation of q and k (complex-valued states written as
2x2 rotations, "RoPE on B and C") and trapezoidal discretisation:

    theta_t = theta_{t-1} + pi * tanh(angle_t) * dt_t                 # [A] rotation angles
    q_t = R(theta_t) (C_t + C_bias),  k_t = R(theta_t) (B_t + B_bias)  # [N], pairs (2i, 2i+1)
    lam_t = sigmoid(trap_t),  alpha_t = exp(adt_t)     (adt = A dt, A < 0)
    h_t = alpha_t h_{t-1} + alpha_t dt_t (1 - lam_t) v_{t-1} k_{t-1}^T + lam_t dt_t v_t k_t^T
    y_t = h_t q_t + D v_t                                             # [P]

Only the first A pairs of the N state channels rotate (A = N * rope_fraction / 2). The
decoding state is (angle [b, H, A], ssm [b, H, P, N], k [b, H, N], v [b, H, P]): the last
rotation angle, h, and the last rotated k and v (the trapezoid's left end). This is the
layout of mamba_ssm's `mamba3_siso_combined` (its Input_States / final states), so either
path continues the other's state.

- `mamba3_siso_ref`: the recurrence one token at a time (the reference for tests).
- `mamba3_siso_chunked`: the same as a chunked linear scan. The trapezoid's two terms fold
  into one weight per token: v_s k_s^T enters h_t (t > s) with decay(s -> t) times
  w_s = lam_s dt_s + dt_{s+1} (1 - lam_{s+1}), and h_s itself with lam_s dt_s only.

Inputs (both functions): q, k [b, l, g, N] (after the B/C norms; head i uses group
i // (H // g)), q_bias, k_bias [H, N], v [b, l, H, P], adt, dt, trap [b, l, H] (trap before
the sigmoid), angle [b, l, H, A] (before the tanh), D [H] or None, state or None.
Returns y [b, l, H, P] and the final state. Computes in float32 (float64 stays float64).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

Mamba3State = tuple[Tensor, Tensor, Tensor, Tensor]  # angle [b,H,A], ssm [b,H,P,N], k [b,H,N], v [b,H,P]


def rotate_pairs(x: Tensor, theta: Tensor) -> Tensor:
    """Rotate channel pairs (2i, 2i+1) of `x [..., N]` by `theta [..., A]` (i < A; the rest unchanged)."""
    n_rot = 2 * theta.shape[-1]
    xr = x[..., :n_rot].unflatten(-1, (-1, 2))  # [..., A, 2]
    c, s = torch.cos(theta), torch.sin(theta)
    x0, x1 = xr[..., 0], xr[..., 1]
    rot = torch.stack([x0 * c - x1 * s, x0 * s + x1 * c], -1).flatten(-2)
    return torch.cat([rot, x[..., n_rot:]], -1)


def _prepare(q, k, q_bias, k_bias, v, adt, dt, trap, angle, state):
    """Shared preprocessing: rotated per-head q, k `[b, l, H, N]`, lam, and the start state."""
    b, l, H, P = v.shape
    g, N = q.shape[-2:]
    ct = torch.float64 if v.dtype == torch.float64 else torch.float32
    q, k, v, adt, dt, trap, angle = (t.to(ct) for t in (q, k, v, adt, dt, trap, angle))
    q = q.repeat_interleave(H // g, dim=2) + q_bias.to(ct)  # [b, l, H, N]
    k = k.repeat_interleave(H // g, dim=2) + k_bias.to(ct)
    if state is None:
        A = angle.shape[-1]
        state = (v.new_zeros(b, H, A), v.new_zeros(b, H, P, N), v.new_zeros(b, H, N), v.new_zeros(b, H, P))
    theta0, h0, k_prev, v_prev = (t.to(ct) for t in state)
    theta = theta0[:, None] + torch.cumsum(math.pi * torch.tanh(angle) * dt[..., None], dim=1)  # [b, l, H, A]
    theta = torch.remainder(theta, 2 * math.pi)
    q, k = rotate_pairs(q, theta), rotate_pairs(k, theta)
    return q, k, v, adt, dt, torch.sigmoid(trap), theta, h0, k_prev, v_prev


def mamba3_siso_ref(q, k, q_bias, k_bias, v, adt, dt, trap, angle, D=None, state: Mamba3State | None = None):
    """The recurrence one token at a time. Shapes: see the module docstring."""
    q, k, v, adt, dt, lam, theta, h, k_prev, v_prev = _prepare(q, k, q_bias, k_bias, v, adt, dt, trap, angle, state)
    ys = []
    for t in range(v.shape[1]):
        alpha = torch.exp(adt[:, t])[..., None, None]  # [b, H, 1, 1]
        beta = alpha * (dt[:, t] * (1 - lam[:, t]))[..., None, None]
        gamma = (lam[:, t] * dt[:, t])[..., None, None]
        h = alpha * h + beta * v_prev[..., None] * k_prev[:, :, None] + gamma * v[:, t, ..., None] * k[:, t, :, None]
        ys.append((h * q[:, t, :, None]).sum(-1))  # [b, H, P]
        k_prev, v_prev = k[:, t], v[:, t]
    y = torch.stack(ys, 1)
    if D is not None:
        y = y + v * D.to(y.dtype)[:, None]
    return y, (theta[:, -1], h, k_prev, v_prev)


def mamba3_siso_chunked(q, k, q_bias, k_bias, v, adt, dt, trap, angle, D=None, state: Mamba3State | None = None,
                        chunk_size: int = 64):
    """The same scan, chunked: quadratic within a chunk, states passed between chunks.
    No data-dependent control flow; lengths need not be a multiple of the chunk."""
    q, k, v, adt, dt, lam, theta, h0, k_prev, v_prev = _prepare(q, k, q_bias, k_bias, v, adt, dt, trap, angle, state)
    b, l, H, P = v.shape
    N = q.shape[-1]
    gamma = lam * dt  # [b, l, H]
    shifted = F.pad((dt * (1 - lam))[:, 1:], (0, 0, 0, 1))  # dt_{s+1} (1 - lam_{s+1}); 0 after the last token
    w = gamma + shifted  # weight of v_s k_s^T in h_t for t > s
    # the trapezoid's left end at t = 0 comes from the state: fold it into the start state
    h0 = h0 + (dt[:, 0] * (1 - lam[:, 0]))[..., None, None] * v_prev[..., None] * k_prev[:, :, None]

    Q = min(chunk_size, l)
    pad = (-l) % Q
    if pad:  # padded tokens: no decay (adt 0), no input (w 0), no output used
        q, k, v = (F.pad(t, (0, 0, 0, 0, 0, pad)) for t in (q, k, v))
        adt, w, gamma = (F.pad(t, (0, 0, 0, pad)) for t in (adt, w, gamma))
    c = (l + pad) // Q
    qc, kc, vc = (t.reshape(b, c, Q, H, -1).permute(0, 3, 1, 2, 4) for t in (q, k, v))  # [b, H, c, Q, .]
    acs = adt.reshape(b, c, Q, H).permute(0, 3, 1, 2).cumsum(-1)  # [b, H, c, Q]
    wc = w.reshape(b, c, Q, H).permute(0, 3, 1, 2)
    gc = gamma.reshape(b, c, Q, H).permute(0, 3, 1, 2)

    # within a chunk: y_t = sum_{s<=t} exp(acs_t - acs_s) w_s (q_t . k_s) v_s, diagonal weight gamma_t
    causal = torch.ones(Q, Q, dtype=torch.bool, device=v.device).tril()
    decay = torch.exp((acs[..., :, None] - acs[..., None, :]).masked_fill(~causal, -math.inf))  # [b, H, c, Q, Q]
    eye = torch.eye(Q, dtype=v.dtype, device=v.device)
    wmat = wc[..., None, :] * (1 - eye) + gc[..., None, :] * eye  # [b, H, c, Q(t), Q(s)]
    scores = (qc @ kc.transpose(-1, -2)) * decay * wmat
    y = scores @ vc  # [b, H, c, Q, P]

    # chunk-end states (from zero), then passed across chunks with the start state
    to_end = torch.exp(acs[..., -1:] - acs) * wc  # [b, H, c, Q]
    states = (vc * to_end[..., None]).transpose(-1, -2) @ kc  # [b, H, c, P, N]
    chunk_decay = torch.exp(acs[..., -1])  # [b, H, c]
    h, entering = h0, []
    for z in range(c):  # c = L / chunk steps of a [b, H, P, N] update
        entering.append(h)
        h = chunk_decay[:, :, z, None, None] * h + states[:, :, z]
    h_in = torch.stack(entering, 2)  # [b, H, c, P, N]
    y = y + (h_in @ qc.transpose(-1, -2)).transpose(-1, -2) * torch.exp(acs)[..., None]
    y = y.permute(0, 2, 3, 1, 4).reshape(b, c * Q, H, P)[:, :l]
    if D is not None:
        y = y + v[:, :l] * D.to(y.dtype)[:, None]
    return y, (theta[:, -1], h, k[:, l - 1], v[:, l - 1])
