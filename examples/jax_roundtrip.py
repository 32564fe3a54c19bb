"""JAX -> reparam -> JAX: fuse a RepVGG block written with ``jax.lax`` and run the result in JAX.

Run: ``python examples/jax_roundtrip.py`` (needs ``jax``; reparam itself does not).

JAX and Flax keep activations NHWC and kernels HWIO, and a Flax ``BatchNorm`` keeps ``scale`` and
``bias`` in ``params`` and ``mean`` and ``var`` in ``batch_stats`` (epsilon 1e-5). The block below
holds its variables exactly that way. reparam converts at the edge (``hwio_to_oihw``,
``BatchNorm.from_flax``), fuses, and converts back (``oihw_to_hwio``); JAX runs the fused conv.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import reparam

FLOAT32_TOLERANCE = 2e-5  # relative to the largest output, as in tests/tolerances.py
DIMENSIONS = ("NHWC", "HWIO", "NHWC")


def conv(x: jax.Array, kernel: Any, *, stride: int, padding: int, groups: int) -> jax.Array:
    return jax.lax.conv_general_dilated(
        x,
        jnp.asarray(kernel),
        window_strides=(stride, stride),
        padding=[(padding, padding), (padding, padding)],
        dimension_numbers=DIMENSIONS,
        feature_group_count=groups,
        precision=jax.lax.Precision.HIGHEST,
    )


def batch_norm(x: jax.Array, params: dict[str, Any], stats: dict[str, Any]) -> jax.Array:
    """Flax's BatchNorm at inference (use_running_average=True), channels last."""
    scale = params["scale"] / jnp.sqrt(stats["var"] + 1e-5)
    return (x - stats["mean"]) * scale + params["bias"]


def random_variables(
    rng: np.random.Generator, cin: int, cout: int, groups: int
) -> dict[str, dict[str, Any]]:
    """A block's Flax-style variables: kernels HWIO, one BatchNorm per branch."""

    def norm(channels: int) -> tuple[dict[str, Any], dict[str, Any]]:
        params = {"scale": rng.uniform(0.5, 1.5, channels), "bias": rng.normal(0, 0.2, channels)}
        stats = {"mean": rng.normal(0, 0.2, channels), "var": rng.uniform(0.5, 2.5, channels)}
        return params, stats

    params: dict[str, Any] = {
        "dense_conv": {"kernel": rng.normal(0, 0.3, (3, 3, cin // groups, cout))},
        "pointwise_conv": {"kernel": rng.normal(0, 0.3, (1, 1, cin // groups, cout))},
    }
    stats: dict[str, Any] = {}
    for name in ("dense_bn", "pointwise_bn", "identity_bn"):
        params[name], stats[name] = norm(cout)
    variables = {"params": params, "batch_stats": stats}
    return jax.tree_util.tree_map(lambda a: np.asarray(a, np.float32), variables)  # type: ignore[no-any-return]


def train_form(variables: dict[str, Any], x: jax.Array, *, stride: int, groups: int) -> jax.Array:
    params, stats = variables["params"], variables["batch_stats"]
    dense = conv(x, params["dense_conv"]["kernel"], stride=stride, padding=1, groups=groups)
    point = conv(x, params["pointwise_conv"]["kernel"], stride=stride, padding=0, groups=groups)
    out = batch_norm(dense, params["dense_bn"], stats["dense_bn"])
    out = out + batch_norm(point, params["pointwise_bn"], stats["pointwise_bn"])
    if stride == 1:
        out = out + batch_norm(x, params["identity_bn"], stats["identity_bn"])
    return jax.nn.relu(out)


def fuse(variables: dict[str, Any], *, stride: int, groups: int) -> tuple[np.ndarray, np.ndarray]:
    """reparam's side: Flax variables in, an HWIO kernel and a bias out."""
    params, stats = variables["params"], variables["batch_stats"]

    def norm(name: str) -> reparam.BatchNorm:
        return reparam.BatchNorm.from_flax(params[name], stats[name], epsilon=1e-5)

    kernel, bias = reparam.fuse_block(
        (reparam.hwio_to_oihw(params["dense_conv"]["kernel"]), norm("dense_bn")),
        (reparam.hwio_to_oihw(params["pointwise_conv"]["kernel"]), norm("pointwise_bn")),
        norm("identity_bn") if stride == 1 else None,
        groups=groups,
    )
    return reparam.oihw_to_hwio(kernel), bias


def round_trip(*, stride: int, groups: int, seed: int) -> float:
    rng = np.random.default_rng(seed)
    channels = 8
    variables = random_variables(rng, channels, channels, groups)
    x = jnp.asarray(rng.standard_normal((2, 11, 7, channels)), dtype=jnp.float32)
    expected = train_form(variables, x, stride=stride, groups=groups)
    kernel, bias = fuse(variables, stride=stride, groups=groups)
    assert kernel.dtype == np.float32, f"float32 variables fused to {kernel.dtype}"
    fused = jax.nn.relu(conv(x, kernel, stride=stride, padding=1, groups=groups) + bias)
    return float(jnp.max(jnp.abs(fused - expected)) / jnp.max(jnp.abs(expected)))


def main() -> None:
    for stride, groups in [(1, 1), (1, 4), (2, 1), (2, 2)]:
        error = round_trip(stride=stride, groups=groups, seed=stride * 10 + groups)
        print(f"stride {stride}, groups {groups}: max relative difference {error:.2e}")
        assert error <= FLOAT32_TOLERANCE, f"stride {stride} groups {groups}: {error}"


if __name__ == "__main__":
    main()
