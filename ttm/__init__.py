"""ssm-ttm-bench: the shared text-to-music harness.

Importing `ttm` sets one process default before torch loads: libgomp's spin count (below).
"""

import os
import sys

__version__ = "0.1.0"

#: How long libgomp (torch's OpenMP on Linux) lets an idle worker spin after a parallel op before it
#: sleeps: 300000 spins (~3 ms) unless set. A spinning worker holds a core that the numba kernels'
#: own threads then share (backbones.ops.selective_scan runs batch slices on a thread pool), so at
#: 2 threads the SSMs' numba work effectively had one core. With 10000 (~0.1 ms, still longer than
#: the gaps between consecutive ops) Mamba1's training step at the demo's shapes ran 1.29x faster
#: (454 -> 353 ms, medians of 4 processes each), Mamba2's 1.07x, the Transformer's level; bit for
#: bit the same (only when idle threads sleep changes).
GOMP_SPINCOUNT = "10000"


def _openmp_defaults() -> bool:
    """Set GOMP_SPINCOUNT when the user set neither it nor OMP_WAIT_POLICY and torch is not yet
    imported (libgomp reads it once, when torch loads it); True when it was set here."""
    if "torch" in sys.modules or "GOMP_SPINCOUNT" in os.environ or "OMP_WAIT_POLICY" in os.environ:
        return False
    os.environ["GOMP_SPINCOUNT"] = GOMP_SPINCOUNT
    return True


#: whether importing ttm set GOMP_SPINCOUNT (recorded with benchmark results)
OPENMP_DEFAULTS_SET = _openmp_defaults()
