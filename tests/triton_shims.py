"""Run mamba_ssm's and fla's Triton kernels on CPU tensors under the Triton interpreter.

Import this module before anything imports triton, mamba_ssm or fla: it sets
TRITON_INTERPRET=1 (read when a kernel is decorated). Then call `install()`, which
returns None when ready or a sentence saying why the kernels cannot run here (tests
skip with it). The packages (see the Makefile's `kernels` step):

    pip install triton einops packaging setuptools wheel numpy
    MAMBA_SKIP_CUDA_BUILD=TRUE MAMBA_FORCE_BUILD=TRUE pip install --no-deps --no-build-isolation mamba-ssm==2.3.2.post1
    pip install --no-deps fla-core==0.6.0 flash-linear-attention==0.6.0

The gaps between the interpreter and a GPU, each shimmed here and nowhere else:

1. `import mamba_ssm` runs its package __init__, which imports the CUDA extension
   `selective_scan_cuda` (absent on CPU). A stand-in package module with the same
   __path__ lets `mamba_ssm.ops.triton.*` import without it.
2. `torch.cuda.device(idx)` (kernels wrap their launches in it) fails on a CPU-only
   torch: it becomes a no-op context for CPU tensors' index None.
3. `triton.autotune` with several configs benchmarks them (no benchmarker on CPU): the
   first config is used.
4. `torch.cuda.get_device_properties(dev).multi_processor_count` (backward launch
   sizing) has no CPU answer: a CPU device reports os.cpu_count() processors.
5. fla's kernels call `.to(...)` on loop variables, which the interpreter leaves as
   Python ints: loop indices of `range`/`tl.range` answer `.to()`.
6. Mamba-3's kernels use PTX inline asm (`cos.approx.f32`, `sin.approx.f32`,
   `tanh.approx.f32`), which the interpreter does not run: these three single-instruction
   snippets are evaluated with numpy (exact functions: the GPU's approximations differ
   from them by ~1e-6 relative).
7. `tl.dot` and elementwise arithmetic on bfloat16 operands work on their raw uint16 bit
   patterns under the interpreter (triton#11584): bf16 operands are widened to float32
   (exact), and elementwise results rounded back to bf16, as on the GPU.
8. Mamba-3's backward wrappers assert `tensor.is_cuda`: inside `compute_dqkv` and
   `compute_dzdo` only, CPU tensors answer True.

With shim 7, kernels that round to bf16 internally (Mamba-3 keeps states in bf16 and
computes its step output with a bf16 dot) can be checked, to bf16 tolerance.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
import types
from collections.abc import Sequence

os.environ["TRITON_INTERPRET"] = "1"
os.environ.setdefault("MAMBA_DETERMINISTIC", "1")  # mamba_ssm: one autotune config

_STATE: dict[str, str | None] = {}


def _already_compiled() -> str | None:
    """Kernels decorated before TRITON_INTERPRET was set (compiled JITFunctions) cannot run
    on CPU; importing them after it was set (tests/conftest.py does) is fine."""
    from triton.runtime.jit import JITFunction

    for name, mod in list(sys.modules.items()):
        if not name.startswith(("mamba_ssm.ops.triton", "fla.ops", "fla.modules")) or mod is None:
            continue
        for obj in vars(mod).values():
            while hasattr(obj, "fn") and not isinstance(obj, JITFunction):  # autotune/heuristics wrappers
                obj = obj.fn
            if type(obj) is JITFunction:  # (gluon kernels subclass it and are never interpreted)
                return f"{name} was imported before TRITON_INTERPRET=1 was set (see tests/conftest.py)"
    return None


def install() -> str | None:
    """Apply the shims once. Returns None when the kernels can run, else why not."""
    if "why" in _STATE:
        return _STATE["why"]
    missing = [p for p in ("triton", "mamba_ssm", "fla", "fla.layers") if not _findable(p)]
    if missing:
        why = (f"kernel packages not installed: {', '.join(missing)} (run `make kernels`, see "
               f"tests/triton_shims.py for the recipe)")
    else:
        why = _already_compiled()
    if why is None:
        _install()
    _STATE["why"] = why
    return why


def _findable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False


def _install() -> None:
    import torch
    import triton.language as tl
    from triton.runtime import autotuner, interpreter

    # 1. mamba_ssm without its package __init__ (which needs the CUDA extension)
    if "mamba_ssm" not in sys.modules:
        spec = importlib.util.find_spec("mamba_ssm")
        pkg = types.ModuleType("mamba_ssm")
        pkg.__path__ = list(spec.submodule_search_locations)
        pkg.__spec__ = spec
        pkg.__version__ = "2.3.2.post1 (Triton ops only: the CUDA extension is not built)"
        sys.modules["mamba_ssm"] = pkg

    # 2. torch.cuda.device(None) on CPU tensors
    real_device = torch.cuda.device

    def cuda_device(idx):
        if idx is None or (isinstance(idx, torch.device) and idx.type == "cpu"):
            return contextlib.nullcontext()
        return real_device(idx)

    torch.cuda.device = cuda_device

    # 3. autotune: the first config, never a benchmark
    real_run = autotuner.Autotuner.run

    def run_first_config(self, *args, **kwargs):
        if len(self.configs) > 1:
            self.configs = self.configs[:1]
        return real_run(self, *args, **kwargs)

    autotuner.Autotuner.run = run_first_config

    # 4. device properties of a CPU device
    real_props = torch.cuda.get_device_properties

    def device_properties(device=None):
        dev = torch.device(device) if device is not None and not isinstance(device, int) else None
        if dev is not None and dev.type == "cpu" or not torch.cuda.is_available():
            return types.SimpleNamespace(multi_processor_count=os.cpu_count() or 1, name="cpu (interpreter)")
        return real_props(device)

    torch.cuda.get_device_properties = device_properties

    # 5. loop variables that answer .to() (fla calls i_t.to(tl.int64))
    _patch_loop_variables(interpreter, tl)

    # 6. PTX approximations of cos, sin, tanh (Mamba-3)
    _patch_inline_asm(interpreter)

    # 7. bf16 tl.dot and elementwise arithmetic
    _patch_bf16(interpreter, tl)

    # 8. Mamba-3 backward's CUDA asserts
    _patch_mamba3_cuda_asserts(torch)


_PTX = {"cos.approx.f32 $0, $1;": "cos", "sin.approx.f32 $0, $1;": "sin", "tanh.approx.f32 $0, $1;": "tanh"}


def _patch_inline_asm(interpreter) -> None:
    import numpy as np

    builder = interpreter.InterpreterBuilder
    real = builder.create_inline_asm

    def create_inline_asm(self, inlineAsm, constraints, values, type, isPure, pack):
        fn = _PTX.get(inlineAsm)
        if fn is None or len(values) != 1:
            return real(self, inlineAsm, constraints, values, type, isPure, pack)
        out = interpreter.TensorHandle(getattr(np, fn)(values[0].data.astype(np.float32)), values[0].dtype.scalar)
        return types.SimpleNamespace(get_result=lambda i: out)  # the op's results, as the compiler's call op

    builder.create_inline_asm = create_inline_asm


def _patch_bf16(interpreter, tl) -> None:
    import numpy as np

    builder = interpreter.InterpreterBuilder
    real = builder.create_dot

    def widen(h):
        if h.dtype.scalar != tl.bfloat16:
            return h
        f32 = (h.data.astype(np.uint32) << np.uint32(16)).view(np.float32)
        return interpreter.TensorHandle(f32, tl.float32)

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        return real(self, widen(a), widen(b), d, input_precision, max_num_imprecise_acc)

    builder.create_dot = create_dot

    real_binary, real_unary = builder.binary_op, builder.unary_op

    def narrow(self, out, like):
        if out.data.dtype == np.bool_:
            return interpreter.TensorHandle(out.data, like.dtype.scalar)
        return self.cast_impl(out, tl.bfloat16)

    def binary_op(self, lhs, rhs, op):
        if tl.bfloat16 not in (lhs.dtype.scalar, rhs.dtype.scalar):
            return real_binary(self, lhs, rhs, op)
        return narrow(self, real_binary(self, widen(lhs), widen(rhs), op), lhs)

    def unary_op(self, arg, op):
        if arg.dtype.scalar != tl.bfloat16:
            return real_unary(self, arg, op)
        return narrow(self, real_unary(self, widen(arg), op), arg)

    builder.binary_op, builder.unary_op = binary_op, unary_op


def _patch_mamba3_cuda_asserts(torch) -> None:
    import functools

    combined = importlib.import_module("mamba_ssm.ops.triton.mamba3.mamba3_siso_combined")
    real_is_cuda = torch.Tensor.is_cuda

    def on_cpu_as_cuda(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            torch.Tensor.is_cuda = property(lambda t: True)
            try:
                return fn(*args, **kwargs)
            finally:
                torch.Tensor.is_cuda = real_is_cuda

        return wrapper

    for name in ("compute_dqkv", "compute_dzdo"):
        setattr(combined, name, on_cpu_as_cuda(getattr(combined, name)))


class _LoopInt(int):
    """A loop index that also answers `.to(dtype)` (as a compiled kernel's index does)."""

    def to(self, *args, **kwargs):
        return self


def _as_int(v) -> int:
    if hasattr(v, "handle"):  # a scalar tl tensor
        return int(v.handle.data.item())
    return int(getattr(v, "value", v))  # tl.constexpr or int


class _LoopRange(Sequence):
    """`range` whose items are `_LoopInt`s (also fine for host code: len, indexing, reversed)."""

    def __init__(self, arg1, arg2=None, step=None, **kwargs):  # kwargs: tl.range's num_stages etc.
        start, end = (0, arg1) if arg2 is None else (arg1, arg2)
        self._r = range(_as_int(start), _as_int(end), 1 if step is None else _as_int(step))

    def __len__(self) -> int:
        return len(self._r)

    def __getitem__(self, i):
        v = self._r[i]
        return _LoopRange(v.start, v.stop, v.step) if isinstance(v, range) else _LoopInt(v)


_loop_range = _LoopRange


def _patch_loop_variables(interpreter, tl) -> None:
    """Kernels see `range`, `tl.range` and `tl.static_range` yielding `_LoopInt`s."""
    real_core = interpreter._patch_lang_core
    real_lang = interpreter._patch_lang

    def patch_core(lang, scope):
        real_core(lang, scope)
        scope.set_attr(lang, "range", _loop_range)
        scope.set_attr(lang, "static_range", _loop_range)

    def patch_lang(fn):
        fn.__globals__["range"] = _loop_range  # a module global shadows the builtin in the kernel body
        return real_lang(fn)

    interpreter._patch_lang_core = patch_core
    interpreter._patch_lang = patch_lang
