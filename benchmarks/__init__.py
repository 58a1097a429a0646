"""Speed and memory benchmarks (`ttm-bench bench`), each a ratio against a peer measured in the same run.

`ttm` is imported first so that its process defaults (libgomp's spin count, `ttm.GOMP_SPINCOUNT`) are set
before torch loads, however the benchmarks are entered (`ttm-bench bench` or `python -m benchmarks.run`):
without them Mamba1's training step measured 1.9x the Transformer's instead of 1.45x.
"""

import ttm  # noqa: F401  (before anything imports torch)
