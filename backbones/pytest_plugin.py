"""pytest plugin: run the backbone contract suite on your own backbone in your own CI.

Registered as the `pytest11` entry point `ttm_bench_contract`, so it is active in any
environment where ssm-ttm-bench is installed:

    def test_my_backbone(ttm_contract):
        ttm_contract("mypkg.mod:MyBackbone")            # or a registered name
        ttm_contract("mypkg.mod:MyBackbone", d_state=8)  # backbone knobs pass through

The call fails the test with the list of failed checks (name and measured
discrepancy) and otherwise returns the list of `CheckResult`s. Without pytest
fixtures, call `assert_contract(...)` directly.

This module imports neither torch nor the backbones at import time: pytest loads it
in every session of the environment.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest


def assert_contract(name_or_path: str, **kwargs: Any) -> list:
    """Run `backbones.contract.run_contract` and fail the current test if any check failed.

    Skipped checks (e.g. the GPU check without CUDA) do not fail. Returns the results.
    """
    from backbones.contract import format_results, run_contract

    results = run_contract(name_or_path, **kwargs)
    failed = [r for r in results if r.passed is False]
    if failed:
        lines = [f"  {r.name}: {r.detail}" for r in failed]
        pytest.fail(
            f"backbone {name_or_path!r} fails {len(failed)} contract check(s):\n"
            + "\n".join(lines)
            + "\n\nfull report:\n"
            + format_results(results),
            pytrace=False,
        )
    return results


@pytest.fixture
def ttm_contract() -> Callable[..., list]:
    """`ttm_contract(name_or_path, **kwargs)`: run the backbone contract suite, fail on any failed check."""
    return assert_contract
