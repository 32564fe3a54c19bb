"""The runnable examples keep working, and their round trips hold on random cases."""

from __future__ import annotations

import runpy
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
FLOAT32_TOLERANCE = 2e-5  # tests/tolerances.py's float32 entry; the examples state it too


@pytest.mark.parametrize("script", ["pytorch_roundtrip.py", "jax_roundtrip.py"])
def test_example_runs(script: str) -> None:
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / script)], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, f"{script} failed:\n{result.stdout}\n{result.stderr}"
    assert "max relative difference" in result.stdout, f"{script} printed:\n{result.stdout}"


@pytest.fixture(scope="module")
def jax_example() -> dict[str, Any]:
    return runpy.run_path(str(EXAMPLES / "jax_roundtrip.py"))


@given(
    stride=st.sampled_from([1, 2]),
    groups=st.sampled_from([1, 2, 4, 8]),
    seed=st.integers(0, 2**16),
)
def test_jax_block_round_trip(
    jax_example: dict[str, Any], stride: int, groups: int, seed: int
) -> None:
    error = jax_example["round_trip"](stride=stride, groups=groups, seed=seed)
    assert error <= FLOAT32_TOLERANCE, f"JAX fused block differs by {error:.2e} (relative)"


@pytest.fixture(scope="module")
def torch_example() -> dict[str, Any]:
    return runpy.run_path(str(EXAMPLES / "pytorch_roundtrip.py"))


def test_torch_half_precision_fusion(torch_example: dict[str, Any]) -> None:
    dtype, ulps = torch_example["half_precision_fusion"]()
    assert dtype == "float16", f"a float16 block must fuse to float16; got {dtype}"
    assert ulps <= 0.5, f"float16 kernel {ulps} ulp from the float64 fusion; expected <= 0.5"
