"""The contract every backbone meets, and the shared block stack.

A backbone maps embeddings `[B, S, D] -> [B, S, D]` causally. It is a stack of
pre-norm residual blocks (RMSNorm -> sublayer -> dropout, + residual):

    mixer (causal sequence mixer: attention, Mamba, Mamba2, S4D, S5, ...)
    [cross-attention to the text memory]   when built with cross_attention=True
    [channel mixer: MLP or EinFFT]          when the backbone has one

Recurrent decoding follows mamba_ssm's `allocate_inference_cache()` / `step()`:

    state = backbone.allocate_state(batch_size, max_len)
    y = backbone(x_prefix, memory, memory_mask, state=state)   # optional prefill
    y_t = backbone.step(x_t, state, memory, memory_mask)       # [B, D] -> [B, D]

A state is a list (one entry per block) of dicts of tensors, updated in place.
Teacher-forced step-by-step decoding must equal the parallel forward.

To add a backbone, write one file with a `Mixer` subclass and a `Backbone`
subclass decorated with `@register("name")`; nothing in the harness changes.
"""

from __future__ import annotations

import importlib
import json
import types
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from backbones.flops import backbone_flops_per_token
from backbones.ops import fused_cpu

State = dict[str, Any]


# ----------------------------------------------------------------------------- kept step constants


def _walk_params(module: nn.Module) -> list[nn.Parameter]:
    """module's parameters and its submodules', as `parameters()` but without its bookkeeping (names, a memo
    of shared ones: 6 us of a ~100 us decoding step; a generator took 4 us, this list 3 us for Mamba1's
    mixer); a shared parameter comes once per holder."""
    out = [p for p in module._parameters.values() if p is not None]
    for child in module._modules.values():
        if child is not None:
            out += _walk_params(child)
    return out


def while_unchanged(module: nn.Module, name: str, params, build: Callable[[], Any], *extra: Any) -> Any:
    """build()'s value, kept on `module` under `name` until one of `params` (None: all of module's) changes
    storage or version counter (an optimiser step, a load, a replaced parameter) or `extra` changes: what a
    decoding step derives from the parameters (a discretisation, numpy views) is then computed once, not
    every token."""
    key = [(p.data_ptr(), p._version) for p in (_walk_params(module) if params is None else params)]
    key.append(extra)
    cached = module.__dict__.get(name)
    if cached is None or cached[0] != key:
        cached = (key, build())
        module.__dict__[name] = cached
    return cached[1]


# ----------------------------------------------------------------------------- sublayers


class RMSNorm(nn.Module):
    def __init__(self, d: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x: Tensor) -> Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)

    def step(self, x: Tensor) -> Tensor:  # [B, D] -> [B, D]
        """`forward` on a decoding step's rows, bit for bit; one numba pass where `fused_cpu.rms_norm_usable`
        (no grad, float32 on CPU): F.rms_norm runs ~12 small ops there, 15-24 us a call, in every block."""
        consts = self.step_consts(x)
        return self.forward(x) if consts is None else fused_cpu.rms_norm_kept(x, consts)

    def step_consts(self, x: Tensor) -> tuple | None:
        """The numba pass's constants for a decoding step's rows x (`fused_cpu.rms_norm_consts`, kept while
        the weight is unchanged: ~4 us a call), or None where the pass cannot stand in for F.rms_norm."""
        w = self.weight
        if not fused_cpu.rms_norm_usable(x, w):
            return None
        return while_unchanged(self, "_step_consts", (w,), lambda: fused_cpu.rms_norm_consts(w, self.eps), self.eps)


def step_product(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """F.linear(x, weight, bias) for a decoding step's rows x [B, D]: `fused_cpu.linear_rows` where
    `fused_cpu.rows_usable` (equal to float32 rounding), else F.linear."""
    if fused_cpu.rows_usable(x, weight):
        return fused_cpu.linear_rows(x, weight, bias)
    return F.linear(x, weight, bias)


def step_linear(layer: nn.Linear, x: Tensor) -> Tensor:
    """layer(x) for a decoding step's rows x [B, D] (`step_product` of its weight and bias)."""
    return step_product(x, layer.weight, layer.bias)


class MLP(nn.Module):
    """Channel mixer d -> ratio*d -> d with GELU (the study's SiMBA uses ratio 2)."""

    def __init__(self, d_model: int, ratio: float = 4.0):
        super().__init__()
        hidden = int(round(d_model * ratio))
        self.fc1 = nn.Linear(d_model, hidden)
        self.fc2 = nn.Linear(hidden, d_model)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))

    def step(self, x: Tensor) -> Tensor:  # [B, D] -> [B, D]
        """`forward` on a decoding step's rows: one numba pass (`fused_cpu.mlp_rows`) where
        `fused_cpu.rows_usable`, equal to float32 rounding."""
        if fused_cpu.rows_usable(x, self.fc1.weight):
            return fused_cpu.mlp_rows(x, self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias)
        return self.forward(x)


class CrossAttention(nn.Module):
    """Attention from the sequence to a text memory `[B, L, D]` with mask `[B, L]` (True = keep).

    In decoding the projected memory keys/values are cached in the state on first use.
    """

    def __init__(self, d_model: int, n_heads: int):
        super().__init__()
        assert d_model % n_heads == 0, f"d_model {d_model} not divisible by n_heads {n_heads}"
        self.n_heads = n_heads
        self.q = nn.Linear(d_model, d_model, bias=False)
        self.kv = nn.Linear(d_model, 2 * d_model, bias=False)
        self.out = nn.Linear(d_model, d_model, bias=False)

    def _kv(self, memory: Tensor) -> tuple[Tensor, Tensor]:
        B, L, D = memory.shape
        k, v = self.kv(memory).view(B, L, 2, self.n_heads, D // self.n_heads).permute(2, 0, 3, 1, 4)
        return k, v  # [B, H, L, Dh] each

    def _cached_kv(self, memory: Tensor, memory_mask: Tensor | None, state: State) -> tuple[Tensor, Tensor]:
        """The memory's keys and values, computed on first use and kept (contiguous) in the decoding state."""
        if "xk" not in state:
            if memory_mask is not None and not bool(memory_mask.any(-1).all()):
                raise ValueError("cross-attention: a row of memory_mask [B, L] keeps no position (True = keep)")
            state["xk"], state["xv"] = (t.contiguous() for t in self._kv(memory))
        return state["xk"], state["xv"]

    def forward(self, x: Tensor, memory: Tensor, memory_mask: Tensor | None, state: State | None = None):
        B, S, D = x.shape
        k, v = self._kv(memory) if state is None else self._cached_kv(memory, memory_mask, state)
        q = self.q(x).view(B, S, self.n_heads, D // self.n_heads).transpose(1, 2)
        mask = None if memory_mask is None else memory_mask[:, None, None, :]  # [B, 1, 1, L]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out(y.transpose(1, 2).reshape(B, S, D))

    def step(self, x: Tensor, memory: Tensor, memory_mask: Tensor | None, state: State) -> Tensor:  # [B, D]
        """`forward` for one decoding step's rows: the products and the attention as numba passes
        (`fused_cpu.linear_rows`, `cross_attend_rows`) where `fused_cpu.rows_usable`, equal to float32 rounding."""
        if not fused_cpu.rows_usable(x, self.q.weight):
            return self.forward(x[:, None], memory, memory_mask, state)[:, 0]
        k, v = self._cached_kv(memory, memory_mask, state)
        y = fused_cpu.cross_attend_rows(fused_cpu.linear_rows(x, self.q.weight), k, v, memory_mask)
        return fused_cpu.linear_rows(y, self.out.weight)


# ----------------------------------------------------------------------------- mixer contract


class Mixer(nn.Module):
    """A causal sequence mixer `[B, S, D] -> [B, S, D]`.

    forward(x, state=None): with a state, `x` continues the sequence held by the
    state (prefill, or one step when S == 1) and the state is updated in place.
    """

    #: True when the decoding state does not grow with sequence length.
    constant_state: bool = True

    def allocate_state(self, batch_size: int, max_len: int, device=None, dtype=None) -> State:
        raise NotImplementedError

    def step(self, x: Tensor, state: State) -> Tensor:
        """One decoding step: `x [B, D] -> [B, D]`."""
        return self.forward(x[:, None], state)[:, 0]

    def step_normed(self, x: Tensor, norm: RMSNorm, state: State) -> Tensor:
        """`step(norm.step(x), state)`: a decoding step from the block's input and its norm (`Block.step`).
        A mixer whose numba pass can apply the norm itself overrides this (S4D, S5: one dispatch and its
        conversions fewer a layer, ~13 us); the result must be the same bits."""
        return self.step(norm.step(x), state)

    def prepare_compiled_step(self) -> None:
        """Run eagerly by `Backbone.compiled_step` before the compiled step: compute what that step
        reads besides the parameters and the state (`_keep_compiled_consts`; S4D's and S5's
        discretisation, which would otherwise be recomputed every token). Default: nothing."""

    def _keep_compiled_consts(self, *consts: Tensor) -> None:
        """Keep `consts` as `self.compiled_consts`, written in place into the previous ones when their
        shapes and dtypes match: the compiled step reads them as inputs, so new values reach it
        without recompiling."""
        old = self.__dict__.get("compiled_consts")
        with torch.inference_mode(False), torch.no_grad():  # ordinary tensors: writable in any mode
            if old is not None and [(o.shape, o.dtype, o.device) for o in old] == [
                (c.shape, c.dtype, c.device) for c in consts
            ]:
                for o, c in zip(old, consts, strict=True):
                    o.copy_(c)
            else:
                self.__dict__["compiled_consts"] = tuple(c.clone() for c in consts)

    def _compiling_consts(self) -> tuple[Tensor, ...] | None:
        """The constants of `prepare_compiled_step` while torch.compile traces the step, else None
        (eager, or compiled without `Backbone.compiled_step`: the mixer's own step runs)."""
        return self.__dict__.get("compiled_consts") if torch.compiler.is_compiling() else None

    def scan_flops_per_token(self, seq_len: int) -> int:
        """Analytic forward FLOPs per token per layer of the scan (recurrences, FFT convs, SSD):
        the work beyond the weight matmuls and attention."""
        return 0

    def scan_flops_counted(self, batch: int, seq_len: int) -> int:
        """FLOPs of one training forward+backward of this layer's scan over `[batch, seq_len]`
        that torch's FLOP counter sees (matmuls inside the scan). `ttm.flops` takes them out
        of its count and adds the scan analytically instead, so the scan counts once and the
        same on every path (a Triton kernel is invisible to the counter, its reference is not)."""
        return 0

    def train_flops_uncounted(self, batch: int, seq_len: int) -> int:
        """FLOPs of one training forward+backward of this layer outside the scan that torch's
        FLOP counter cannot see (hand-written replacements of ops it counts, e.g. a conv)."""
        return 0

    def context_flops_per_token(self, context_len: float) -> float:
        """FLOPs per token per layer of mixing over `context_len` earlier tokens that are not
        weight matmuls (attention's QK^T and AV); 0 for mixers that carry a state instead."""
        return 0

    def state_numel(self, state: State) -> int:
        return sum(t.numel() for t in state.values() if torch.is_tensor(t))


class Block(nn.Module):
    def __init__(
        self,
        d_model: int,
        mixer: Mixer,
        cross_attention: bool = False,
        n_heads: int = 4,
        channel_mixer: nn.Module | None = None,
        dropout: float = 0.0,
    ):
        super().__init__()
        self.norm1 = RMSNorm(d_model)
        self.mixer = mixer
        self.cross = CrossAttention(d_model, n_heads) if cross_attention else None
        self.norm_x = RMSNorm(d_model) if cross_attention else None
        self.channel = channel_mixer
        self.norm2 = RMSNorm(d_model) if channel_mixer is not None else None
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor, memory=None, memory_mask=None, state: State | None = None) -> Tensor:
        x = x + self.drop(self.mixer(self.norm1(x), state=None if state is None else state["mixer"]))
        if self.cross is not None:
            if memory is None:
                raise ValueError("this backbone was built with cross_attention=True: pass the text memory")
            xs = None if state is None else state["cross"]
            x = x + self.drop(self.cross(self.norm_x(x), memory, memory_mask, xs))
        if self.channel is not None:
            x = x + self.drop(self.channel(self.norm2(x)))
        return x

    def step(self, x: Tensor, state: State, memory=None, memory_mask=None) -> Tensor:  # [B, D]
        x = x + self.mixer.step_normed(x, self.norm1, state["mixer"])
        if self.cross is not None:
            x = x + self.cross.step(self.norm_x.step(x), memory, memory_mask, state["cross"])
        if self.channel is not None:  # any [..., D] module; one with a `step` (the MLP's) decodes through it
            x = x + getattr(self.channel, "step", self.channel)(self.norm2.step(x))
        return x


# ----------------------------------------------------------------------------- backbone


class Backbone(nn.Module):
    """A stack of blocks plus a final norm. Subclasses implement `make_mixer`.

    Subclass keyword arguments are the backbone's size knobs; `config()` returns
    everything needed to rebuild it.
    """

    name: str = "?"
    #: Whether the LM must add positional embeddings (attention has no order by itself).
    needs_positions: bool = False
    #: Channel mixer ratio (None = no channel mixer sublayer).
    default_mlp_ratio: float | None = None
    #: Knob `size_to` fine-tunes after choosing depth/width: (name, low, high, integer step or 0).
    size_knob: tuple[str, float, float, int] = ("mlp_ratio", 0.25, 16.0, 0)

    def __init__(
        self,
        d_model: int = 64,
        n_layers: int = 2,
        cross_attention: bool = False,
        n_heads: int = 4,
        dropout: float = 0.0,
        mlp_ratio: float | None | str = "default",
        **mixer_kwargs: Any,
    ):
        super().__init__()
        self.d_model, self.n_layers, self.cross_attention = d_model, n_layers, cross_attention
        self.n_heads, self.dropout = n_heads, dropout
        self.mlp_ratio = self.default_mlp_ratio if mlp_ratio == "default" else mlp_ratio
        self.mixer_kwargs = mixer_kwargs
        self.blocks = nn.ModuleList(
            Block(
                d_model,
                self.make_mixer(i),
                cross_attention=cross_attention,
                n_heads=n_heads,
                channel_mixer=self.make_channel_mixer(i),
                dropout=dropout,
            )
            for i in range(n_layers)
        )
        self.norm_f = RMSNorm(d_model)

    # -- to override
    def make_mixer(self, layer_idx: int) -> Mixer:
        raise NotImplementedError

    def make_channel_mixer(self, layer_idx: int) -> nn.Module | None:
        """A [..., D] -> [..., D] module after each mixer, or None. A decoding step calls its
        `step(x [B, D])` when it has one (the MLP's row kernels), else the module itself."""
        return None if self.mlp_ratio is None else MLP(self.d_model, self.mlp_ratio)

    # -- contract
    def config(self) -> dict[str, Any]:
        return dict(
            d_model=self.d_model,
            n_layers=self.n_layers,
            cross_attention=self.cross_attention,
            n_heads=self.n_heads,
            dropout=self.dropout,
            mlp_ratio=self.mlp_ratio,
            **self.mixer_kwargs,
        )

    def forward(self, x: Tensor, memory=None, memory_mask=None, state: list[State] | None = None) -> Tensor:
        for i, blk in enumerate(self.blocks):
            x = blk(x, memory, memory_mask, None if state is None else state[i])
        return self.norm_f(x)

    def allocate_state(self, batch_size: int, max_len: int, device=None, dtype=None) -> list[State]:
        p = next(self.parameters())
        device = device or p.device
        dtype = dtype or p.dtype
        return [
            {"mixer": blk.mixer.allocate_state(batch_size, max_len, device, dtype), "cross": {}}
            for blk in self.blocks
        ]

    def step(self, x: Tensor, state: list[State], memory=None, memory_mask=None) -> Tensor:
        for blk, st in zip(self.blocks, state):
            x = blk.step(x, st, memory, memory_mask)
        return self.norm_f.step(x)

    def compiled_step(self) -> Callable[..., Tensor]:
        """`step` through torch.compile, built on the first call and kept on the module (it
        recompiles only when shapes change): `TTMLM.generate(compile_step=True)`. A step at small
        sizes is per-op dispatch; compiled, its elementwise work fuses into a few loops. On CUDA it
        is also captured as a CUDA graph (mode "reduce-overhead", as mamba_ssm's generation does).
        Equal to `step` to float tolerance, not bit for bit; what each backbone gains is measured by
        `ttm-bench bench --only decode_compiled`. A mixer whose step uses complex tensors gives the
        compiler a real-arithmetic path (`torch.compiler.is_compiling()`; S4D, S5): the compiler
        fuses no complex ops, and such a step ran at half its eager speed.

        Each call first runs every mixer's `prepare_compiled_step` (S4D's and S5's discretisation,
        from the parameters as they are now), so the returned step decodes with the parameters of
        this call: call it again after changing them (`generate` calls it once per call)."""
        with torch.no_grad():
            for blk in self.blocks:
                blk.mixer.prepare_compiled_step()
        fn = self.__dict__.get("_compiled_step")
        if fn is None:
            cuda = next(self.parameters()).device.type == "cuda"
            fn = torch.compile(self._own_step_frame(), mode="reduce-overhead" if cuda else None)
            self.__dict__["_compiled_step"] = fn
        return fn

    def _own_step_frame(self) -> Callable[..., Tensor]:
        """`self.step` through a copy of its code object named for this backbone's class and
        configuration. torch.compile keeps its graphs, its recompile budget and the sizes it has seen
        (automatic dynamic shapes, also saved on disk as its local profile) per code object and name.
        With the one `step` every backbone shares, a second model's sizes differing from the first's
        recompiled it with symbolic sizes: S4D's compiled step ran 1.3 -> 2.1 ms per token when a
        Mamba2's had been compiled before it in the process. Models of one class and configuration
        share a name (the same sizes), each instance its own graphs."""
        f = type(self).step
        name = f"{type(self).__name__}.step({', '.join(f'{k}={v!r}' for k, v in sorted(self.config().items()))})"
        own = types.FunctionType(f.__code__.replace(co_name=name, co_qualname=name), f.__globals__, name,
                                 f.__defaults__, f.__closure__)
        own.__kwdefaults__ = f.__kwdefaults__  # a subclass's step may take keyword-only arguments
        return own.__get__(self)

    @property
    def constant_state(self) -> bool:
        return all(b.mixer.constant_state for b in self.blocks)

    def state_size(self, batch_size: int = 1, seq_len: int = 1024) -> int:
        """Elements of decoding state (self-mixer only) after `seq_len` tokens."""
        with torch.device("meta"):
            st = self.allocate_state(batch_size, seq_len, device="meta")
        return sum(b.mixer.state_numel(s["mixer"]) for b, s in zip(self.blocks, st))

    def num_params(self) -> int:
        return count_params(self)

    def scan_flops_per_token(self, seq_len: int) -> int:
        return sum(b.mixer.scan_flops_per_token(seq_len) for b in self.blocks)

    def scan_flops_counted(self, batch: int, seq_len: int) -> int:
        return sum(b.mixer.scan_flops_counted(batch, seq_len) for b in self.blocks)

    def train_flops_uncounted(self, batch: int, seq_len: int) -> int:
        return sum(b.mixer.train_flops_uncounted(batch, seq_len) for b in self.blocks)

    def flops_per_token(self, seq_len: int, memory_len: int = 0, mode: str = "train") -> int:
        """Analytic FLOPs per token: 2 * matmul params (x3 for training fwd+bwd) + attention + scans.

        `mode` is "train" (forward+backward) or "decode" (one forward step).
        """
        return backbone_flops_per_token(self, seq_len, memory_len, mode)


def count_params(module: nn.Module, trainable_only: bool = True) -> int:
    """Parameter count; complex parameters count twice (real and imaginary part)."""
    n = 0
    for p in module.parameters():
        if trainable_only and not p.requires_grad:
            continue
        n += p.numel() * (2 if p.is_complex() else 1)
    return n


# ----------------------------------------------------------------------------- registry

_REGISTRY: dict[str, type[Backbone]] = {}
_BUILTINS = ["transformer", "mamba", "mamba2", "mamba3", "s4d", "s5", "simba", "hybrid", "fla"]


def register(name: str) -> Callable[[type[Backbone]], type[Backbone]]:
    def deco(cls: type[Backbone]) -> type[Backbone]:
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return deco


def _load_builtins() -> None:
    for mod in _BUILTINS:
        try:
            importlib.import_module(f"backbones.{mod}")
        except ModuleNotFoundError as e:  # a built-in not written yet must not hide the others
            if e.name != f"backbones.{mod}":
                raise
    try:
        from importlib.metadata import entry_points

        for ep in entry_points(group="ttm_bench.backbones"):
            if ep.name not in _REGISTRY:
                cls = ep.load()
                _REGISTRY[ep.name] = cls
    except Exception as e:  # a broken third-party plugin is reported, not fatal
        import warnings

        warnings.warn(f"ttm_bench.backbones entry point failed to load: {e}")


def registered() -> dict[str, type[Backbone]]:
    _load_builtins()
    return dict(sorted(_REGISTRY.items()))


def get_backbone_cls(name: str) -> type[Backbone]:
    """A registered name, or a dotted path `pkg.module:Class` (or `pkg.module.Class`)."""
    reg = registered()
    if name in reg:
        return reg[name]
    if ":" in name or "." in name:
        mod, _, attr = name.partition(":") if ":" in name else name.rpartition(".")
        try:
            cls = getattr(importlib.import_module(mod), attr)
        except (ImportError, AttributeError) as e:
            raise ValueError(
                f"cannot load backbone {name!r} ({e}); registered backbones: {', '.join(reg)}"
            ) from e
        if not (isinstance(cls, type) and issubclass(cls, Backbone)):
            raise ValueError(f"{name!r} is not a backbones.base.Backbone subclass")
        return cls
    raise ValueError(f"unknown backbone {name!r}; registered backbones: {', '.join(reg)}")


def build_backbone(name: str, **kwargs: Any) -> Backbone:
    return get_backbone_cls(name)(**kwargs)


@dataclass
class SizeResult:
    kwargs: dict[str, Any]
    params: int
    target: int

    @property
    def rel_error(self) -> float:
        return abs(self.params - self.target) / self.target


_PARAM_COUNTS: dict[tuple[type, str], int] = {}


def backbone_params(cls: type[Backbone], kw: dict[str, Any]) -> int:
    """Trainable parameters of `cls(**kw)`, built once on the meta device per class and kwargs in a
    process: `size_to`'s searches revisit the same sizes, and a run builds its model twice (training,
    then generation). Building can be slow (the s5-pytorch package initialises element by element:
    ~0.1 s a layer on the meta device), so a sizing had taken 10-15 s for S5."""
    key = (cls, json.dumps(kw, sort_keys=True, default=repr))
    if key not in _PARAM_COUNTS:
        with torch.device("meta"):
            _PARAM_COUNTS[key] = count_params(cls(**kw))
    return _PARAM_COUNTS[key]


def size_to(
    name: str,
    target_params: int,
    vary: str = "n_layers",
    tol: float = 0.01,
    extra_params: Callable[[dict[str, Any]], int] | None = None,
    strict: bool = True,
    **fixed: Any,
) -> SizeResult:
    """Choose `vary` (an integer knob, e.g. n_layers or d_model) so the parameter count
    (backbone + `extra_params(kwargs)`, e.g. the LM's embeddings and heads) is closest
    to `target_params`. Models are built on the meta device (no memory), each size once per process
    (`backbone_params`).
    When `vary` alone cannot reach `tol`, the other continuous knob (mlp_ratio or
    expand when the backbone has one) is fine-tuned. With `strict`, missing `tol` is an error
    that names the closest achievable count; otherwise the closest result is returned.
    """
    cls = get_backbone_cls(name)

    def count(kw: dict[str, Any]) -> int:
        return backbone_params(cls, kw) + (extra_params(kw) if extra_params else 0)

    step = 1
    if vary == "d_model":
        step = 2 * int(fixed.get("n_heads", 4))  # keep heads (and halves for complex) divisible
    lo, hi = step, step
    while count({**fixed, vary: hi}) < target_params:
        lo, hi = hi, hi * 2
        if hi > 1 << 20:
            raise ValueError(f"{name}: cannot reach {target_params} params by varying {vary}")
    # binary search on multiples of step
    while hi - lo > step:
        mid = (lo + hi) // 2 // step * step
        if count({**fixed, vary: mid}) < target_params:
            lo = mid
        else:
            hi = mid
    best = min((lo, hi), key=lambda v: abs(count({**fixed, vary: v}) - target_params))
    kw = {**fixed, vary: best}
    res = SizeResult(kw, count(kw), target_params)
    if res.rel_error > tol:
        tuned = _fine_tune(cls, count, kw, target_params)
        if tuned is not None and tuned.rel_error < res.rel_error:  # a knob without effect is not kept
            res = tuned
    if strict and res.rel_error > tol:
        shown = ", ".join(f"{k}={res.kwargs[k]}" for k in (vary, cls.size_knob[0]) if k in res.kwargs)
        raise ValueError(
            f"{name}: cannot match target_params={target_params:,} within {100 * tol:g}%: the closest "
            f"achievable is {res.params:,} params ({shown}, {100 * res.rel_error:.1f}% off)"
        )
    return res


def _fine_tune(cls, count, kw, target) -> SizeResult | None:
    """Bisect the backbone's continuous size knob (`size_knob`) to close the remaining gap."""
    knob, lo, hi, step = cls.size_knob
    if knob == "mlp_ratio" and kw.get("mlp_ratio", "default") in (None, "default") and cls.default_mlp_ratio is None:
        return None  # no channel mixer: the ratio has no effect

    def val(x: float):
        return x if not step else max(int(lo), int(round(x / step)) * step)

    for _ in range(40):
        mid = (lo + hi) / 2
        if count({**kw, knob: val(mid)}) < target:
            lo = mid
        else:
            hi = mid
    cands = [{**kw, knob: round(val(x), 4) if not step else val(x)} for x in (lo, hi)]
    best = min(cands, key=lambda c: abs(count(c) - target))
    return SizeResult(best, count(best), target)


def sinusoidal_positions(n: int, d: int, offset: int = 0, device=None) -> Tensor:
    """Sinusoidal position table `[n, d]` starting at position `offset`."""
    pos = torch.arange(offset, offset + n, device=device, dtype=torch.float32)[:, None]
    i = torch.arange(0, d, 2, device=device, dtype=torch.float32)
    ang = pos / (10000 ** (i / d))
    out = torch.zeros(n, d, device=device)
    out[:, 0::2] = torch.sin(ang)
    out[:, 1::2] = torch.cos(ang[:, : d // 2])
    return out
