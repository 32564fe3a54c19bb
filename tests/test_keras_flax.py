"""Keras 3 and Flax run the round trips themselves: train form and fused form, same outputs.

The functions come from examples/keras_roundtrip.py and examples/flax_roundtrip.py, whose
main() runs here too, so the examples and these checks cannot drift apart. Shapes stay
small, and each Hypothesis test draws its configuration from a few values: a new configuration
costs JAX a compilation (about a second), a new seed on a known one a few milliseconds.
"""

from __future__ import annotations

import os

os.environ.setdefault("KERAS_BACKEND", "jax")

import runpy
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
FLOAT32_TOLERANCE = 2e-5  # tests/tolerances.py's float32 entry, relative to the largest output
WRONG = 1e3 * FLOAT32_TOLERANCE  # a fusion this far off is a different network, not rounding

# Keras 3.15's Variable.__array__ lacks NumPy 2's copy= keyword, so get_weights() warns; only
# that warning, only from keras, is let through.
pytestmark = pytest.mark.filterwarnings(
    "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning:keras"
)

SEEDS = st.integers(0, 2**16)
FEW = settings(max_examples=20)  # per test, whatever the profile: see the module docstring


@pytest.fixture(scope="module")
def keras_example() -> dict[str, Any]:
    return runpy.run_path(str(EXAMPLES / "keras_roundtrip.py"))


@pytest.fixture(scope="module")
def flax_example() -> dict[str, Any]:
    return runpy.run_path(str(EXAMPLES / "flax_roundtrip.py"))


@pytest.mark.parametrize("script", ["keras_roundtrip.py", "flax_roundtrip.py"])
def test_example_runs(script: str, capsys: pytest.CaptureFixture[str]) -> None:
    """Each script's main(), as ``python examples/<script>`` runs it (it asserts each case).

    In this process rather than a new one, as test_examples.py does for the others: the
    compilations it triggers are then reused by the tests below (half the time).
    """
    runpy.run_path(str(EXAMPLES / script), run_name="__main__")
    printed = capsys.readouterr().out
    assert printed.count("max relative difference") >= 8, f"{script} printed:\n{printed}"


def test_keras_script_chooses_the_jax_backend() -> None:
    """Run alone, with no KERAS_BACKEND set, the Keras example still runs on JAX."""
    environment = {k: v for k, v in os.environ.items() if k != "KERAS_BACKEND"}
    code = f"import runpy; print(runpy.run_path({str(EXAMPLES / 'keras_roundtrip.py')!r})"
    code += "['keras'].backend.backend())"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=environment
    )
    assert result.returncode == 0, f"importing the Keras example failed:\n{result.stderr}"
    assert result.stdout.strip() == "jax", f"Keras backend {result.stdout.strip()!r}, not jax"


@FEW
@given(
    stride=st.sampled_from([1, 2]),
    groups=st.sampled_from([1, 4]),
    seed=SEEDS,
)
def test_keras_block_round_trip(
    keras_example: dict[str, Any], stride: int, groups: int, seed: int
) -> None:
    error = keras_example["block_round_trip"](stride=stride, groups=groups, seed=seed)
    assert error <= FLOAT32_TOLERANCE, (
        f"Keras block (ZeroPadding2D + valid, stride {stride}, groups {groups}) and its fused "
        f"Conv2D differ by {error:.2e} of the largest output"
    )


@pytest.mark.parametrize("groups", [1, 2])
def test_keras_same_padding_at_stride_1(keras_example: dict[str, Any], groups: int) -> None:
    error = keras_example["block_round_trip"](stride=1, groups=groups, padding="same", seed=7)
    assert error <= FLOAT32_TOLERANCE, f'"same" at stride 1 is symmetric; differs by {error:.2e}'


@pytest.mark.parametrize(
    ("size", "right_tap", "wrong_tap"), [(8, "corner", "centre"), (7, "centre", "corner")]
)
def test_keras_same_padding_trap_at_stride_2(
    keras_example: dict[str, Any], size: int, right_tap: str, wrong_tap: str
) -> None:
    """ "same" pads (0, 1) at stride 2 on an even input: the 1x1 belongs on the corner tap there."""

    def error(tap: str) -> float:
        return keras_example["block_round_trip"](
            stride=2, groups=1, padding="same", size=size, tap=tap, seed=3
        )

    right, wrong = error(right_tap), error(wrong_tap)
    assert right <= FLOAT32_TOLERANCE, f"{size}x{size}, {right_tap} tap: differs by {right:.2e}"
    assert wrong >= WRONG, f"{size}x{size}, {wrong_tap} tap should be wrong; off by {wrong:.2e}"


def test_keras_explicit_padding_fixes_stride_2(keras_example: dict[str, Any]) -> None:
    """The documented fix: ZeroPadding2D(1) + "valid" fuses at stride 2 on even and odd inputs."""
    for size in (8, 7):
        error = keras_example["block_round_trip"](stride=2, groups=1, size=size, seed=3)
        assert error <= FLOAT32_TOLERANCE, f"explicit padding, {size} rows: {error:.2e}"


def test_keras_identity_without_scale_and_center(keras_example: dict[str, Any]) -> None:
    error = keras_example["block_round_trip"](stride=1, groups=1, affine_identity=False, seed=5)
    assert error <= FLOAT32_TOLERANCE, f"identity BN scale=False, center=False: {error:.2e}"


def test_keras_epsilon_is_the_layers(keras_example: dict[str, Any]) -> None:
    """With variances ~1e-2, folding with PyTorch's 1e-5 instead of Keras' 1e-3 is wrong."""
    options = {"stride": 1, "groups": 1, "var_scale": 1e-2, "seed": 2}
    own = keras_example["block_round_trip"](**options)
    torch_default = keras_example["block_round_trip"](**options, epsilon=1e-5)
    assert own <= FLOAT32_TOLERANCE, f"with the layers' epsilon 1e-3: {own:.2e}"
    assert torch_default >= WRONG, f"epsilon 1e-5 should give another network; {torch_default}"


def test_keras_whole_repvgg(keras_example: dict[str, Any]) -> None:
    result = keras_example["model_round_trip"](seed=4)
    train, deploy = result["train"], result["deploy"]
    assert result["difference"] <= FLOAT32_TOLERANCE, (
        f"small RepVGG logits differ by {result['difference']:.2e} of the largest logit"
    )
    layer_types = {type(layer).__name__ for layer in deploy.layers}
    assert "BatchNormalization" not in layer_types, f"deploy model has {sorted(layer_types)}"
    blocks = keras_example["SMALL_REPVGG"]
    convs = [layer for layer in deploy.layers if type(layer).__name__ == "Conv2D"]
    assert len(convs) == len(blocks), f"{len(convs)} Conv2D layers for {len(blocks)} blocks"
    expected = sum(9 * cin // g * cout + cout for cin, cout, _, g in blocks) + 16 * 10 + 10
    assert deploy.count_params() == expected, f"{deploy.count_params()} != {expected} parameters"
    assert train.count_params() > expected, "the train form has more parameters than the deploy"


@FEW
@given(
    stride=st.sampled_from([1, 2]),
    groups=st.sampled_from([1, 4]),
    affine_identity=st.booleans(),
    seed=SEEDS,
)
def test_flax_linen_block_round_trip(
    flax_example: dict[str, Any], stride: int, groups: int, affine_identity: bool, seed: int
) -> None:
    error = flax_example["linen_round_trip"](
        stride=stride, groups=groups, affine_identity=affine_identity, seed=seed
    )
    assert error <= FLOAT32_TOLERANCE, (
        f"linen block (stride {stride}, groups {groups}, identity scale and bias "
        f"{affine_identity}) and its fused nn.Conv differ by {error:.2e}"
    )


@FEW
@given(stride=st.sampled_from([1, 2]), groups=st.sampled_from([1, 4]), seed=SEEDS)
def test_flax_nnx_block_round_trip(
    flax_example: dict[str, Any], stride: int, groups: int, seed: int
) -> None:
    error = flax_example["nnx_round_trip"](stride=stride, groups=groups, seed=seed)
    assert error <= FLOAT32_TOLERANCE, (
        f"nnx block (stride {stride}, groups {groups}) and its fused nnx.Conv differ by {error:.2e}"
    )


@pytest.mark.parametrize(("stride", "size"), [(1, 8), (2, 7)])
def test_flax_same_padding_where_symmetric(
    flax_example: dict[str, Any], stride: int, size: int
) -> None:
    error = flax_example["linen_round_trip"](stride=stride, groups=1, padding="SAME", size=size)
    assert error <= FLOAT32_TOLERANCE, f'"SAME", stride {stride}, {size} rows: {error:.2e}'


def test_flax_same_padding_trap_at_stride_2(flax_example: dict[str, Any]) -> None:
    error = flax_example["linen_round_trip"](stride=2, groups=1, padding="SAME", size=8)
    assert error >= WRONG, f'"SAME" at stride 2 on 8 rows should not fuse centred; {error:.2e}'
