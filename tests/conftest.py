import os

import pytest
import torch

# Triton kernels (mamba_ssm, fla) are decorated for the CPU interpreter when no GPU is here;
# it must be set before they are first imported (tests/test_kernels_interp.py runs them)
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# 2-core machines: one thread per test process keeps timings predictable
torch.set_num_threads(int(os.environ.get("TTM_TEST_THREADS", "1")))


def pytest_collection_modifyitems(config, items):
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs CUDA")
        for it in items:
            if "gpu" in it.keywords:
                it.add_marker(skip)
