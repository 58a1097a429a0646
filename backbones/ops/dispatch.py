"""Kernel or reference: one explicit knob per mixer, and a record of the path that ran.

Every mixer with an optional GPU kernel takes `kernel = "auto" | "kernel" | "reference"`:

    "reference"  always the suite's own pure implementation (PyTorch, or numba on CPU);
    "kernel"     always the library kernel; if it cannot be imported this raises
                 `KernelUnavailable` naming the missing module. CPU tensors are allowed
                 (Triton kernels run on CPU under TRITON_INTERPRET=1, which the tests use);
    "auto"       the kernel on CUDA tensors when it imports, else the reference.

Each forward records the path it took in the mixer's `kernel_path`; `kernel_paths(model)`
collects them (the training summary stores it), so no run silently falls back.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable

from torch import Tensor, nn

KERNEL_MODES = ("auto", "kernel", "reference")


class KernelUnavailable(RuntimeError):
    """`kernel="kernel"` was asked for and the kernel's module does not import."""


_CACHE: dict[tuple[str, str], Any] = {}


def load_kernel(module: str, attr: str) -> Callable:
    """`module.attr`, imported once; raises KernelUnavailable with the import error otherwise."""
    key = (module, attr)
    if key not in _CACHE:
        try:
            _CACHE[key] = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as e:  # a missing package or a broken build (no CUDA extension)
            _CACHE[key] = KernelUnavailable(f"kernel {module}.{attr} is not available: {type(e).__name__}: {e}")
    hit = _CACHE[key]
    if isinstance(hit, KernelUnavailable):
        raise KernelUnavailable(str(hit))
    return hit


def kernel_available(module: str, attr: str) -> bool:
    try:
        load_kernel(module, attr)
    except KernelUnavailable:
        return False
    return True


def check_mode(owner: str, mode: str) -> str:
    if mode not in KERNEL_MODES:
        raise ValueError(f"{owner}: kernel must be one of {', '.join(KERNEL_MODES)}, got {mode!r}")
    return mode


class KernelSwitch:
    """Mixin for mixers with a kernel path: the `kernel` knob, `use_kernel` (the contract's
    boolean switch: True = "kernel", False = "reference") and `kernel_path`, the path each
    op took the latest time it ran: {op: "kernel: module.fn" or "reference: what"}."""

    kernel: str = "auto"
    kernel_path: dict[str, str] | None = None

    @property
    def use_kernel(self) -> bool:
        return self.kernel != "reference"

    @use_kernel.setter
    def use_kernel(self, value: bool) -> None:
        self.kernel = "kernel" if value else "reference"

    def pick_kernel(self, x: Tensor, module: str, attr: str, usable: bool = True) -> Callable | None:
        """The kernel to run on `x`, or None for the reference. `usable=False` marks a call
        the kernel does not cover (e.g. Mamba1's CUDA scan cannot start from a state): the
        reference runs and the caller records why. With kernel="kernel" a kernel that does
        not import raises KernelUnavailable even then."""
        if self.kernel == "reference":
            return None
        if self.kernel == "kernel":
            fn = load_kernel(module, attr)
            return fn if usable else None
        if x.is_cuda and usable and kernel_available(module, attr):
            return load_kernel(module, attr)
        return None

    def record_path(self, op: str, kernel: Callable | None, module: str, attr: str, reference: str) -> None:
        if self.kernel_path is None:
            self.kernel_path = {}
        self.kernel_path[op] = f"kernel: {module}.{attr}" if kernel is not None else f"reference: {reference}"


def kernel_paths(model: nn.Module) -> dict[str, dict[str, str | None]]:
    """{module name: {"kernel": knob, "ran": {op: path} (None before any call)}} for every
    mixer with a kernel switch in `model`."""
    return {
        name: {"kernel": m.kernel, "ran": None if m.kernel_path is None else dict(m.kernel_path)}
        for name, m in model.named_modules()
        if isinstance(m, KernelSwitch)
    }
