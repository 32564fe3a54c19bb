"""Flax -> reparam -> Flax: fuse a RepVGG block written with real Flax modules, linen and nnx.

Run: ``python examples/flax_roundtrip.py`` (needs ``flax``; reparam itself does not).

The train-form block is ``nn.Conv`` (HWIO kernels, ``feature_group_count=`` for groups) and
``nn.BatchNorm(use_running_average=True)`` per branch. Its variables split into ``params``
(``kernel``; BatchNorm ``scale`` and ``bias``, either absent with ``use_scale=False`` /
``use_bias=False``) and ``batch_stats`` (``mean``, ``var``), epsilon 1e-5. reparam reads the two
collections (``BatchNorm.from_flax``, ``hwio_to_oihw``), fuses, and returns the variables of
one ``nn.Conv`` with bias; Flax runs both forms. An ``nnx`` block gives the same two
collections through ``nnx.state(block, nnx.Param)`` and ``nnx.state(block, nnx.BatchStat)``,
and takes the fused kernel back with ``nnx.update``.

Padding: explicit ``((1, 1), (1, 1))`` on the 3x3 and ``"VALID"`` on the 1x1 is the PyTorch
original and fuses exactly. ``"SAME"`` (Flax's default) pads (0, 1) at stride 2 on an even
input, where no centred fused kernel is right (see docs/howto/jax-flax.md).
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import reparam

FLOAT32_TOLERANCE = 2e-5  # relative to the largest output, as in tests/tolerances.py
SYMMETRIC = ((1, 1), (1, 1))


def paddings(padding: str) -> tuple[Any, Any]:
    """The 3x3's and the 1x1's padding: explicit (PyTorch's) or Flax's "SAME"."""
    return (SYMMETRIC, "VALID") if padding == "explicit" else ("SAME", "SAME")


class RepVGGBlock(nn.Module):
    """Train form: relu(BN(conv3x3(x)) + BN(conv1x1(x)) [+ BN(x)]), in flax.linen."""

    features: int
    stride: int = 1
    groups: int = 1
    padding: str = "explicit"
    affine_identity: bool = True  # False: the identity BN has use_scale=False, use_bias=False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        dense_padding, pointwise_padding = paddings(self.padding)
        conv = functools.partial(
            nn.Conv,
            self.features,
            strides=self.stride,
            feature_group_count=self.groups,
            use_bias=False,
        )
        norm = functools.partial(nn.BatchNorm, use_running_average=True)
        out = norm(name="bn3")(conv((3, 3), padding=dense_padding, name="conv3")(x))
        out = out + norm(name="bn1")(conv((1, 1), padding=pointwise_padding, name="conv1")(x))
        if self.stride == 1 and x.shape[-1] == self.features:
            affine = self.affine_identity
            out = out + norm(use_scale=affine, use_bias=affine, name="bn0")(x)
        return nn.relu(out)


class FusedBlock(nn.Module):
    """Deploy form: relu(conv3x3(x) + b), one nn.Conv named ``conv``."""

    features: int
    stride: int = 1
    groups: int = 1
    padding: str = "explicit"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        conv = nn.Conv(
            self.features,
            (3, 3),
            strides=self.stride,
            padding=paddings(self.padding)[0],
            feature_group_count=self.groups,
            name="conv",
        )
        return nn.relu(conv(x))


class NnxRepVGGBlock(nnx.Module):
    """The same train form in flax.nnx (explicit padding), ``channels`` in and out."""

    def __init__(self, channels: int, *, stride: int, groups: int, rngs: nnx.Rngs) -> None:
        conv = functools.partial(
            nnx.Conv,
            channels,
            channels,
            strides=stride,
            feature_group_count=groups,
            use_bias=False,
            rngs=rngs,
        )
        norm = functools.partial(nnx.BatchNorm, channels, use_running_average=True, rngs=rngs)
        self.conv3, self.bn3 = conv((3, 3), padding=SYMMETRIC), norm()
        self.conv1, self.bn1 = conv((1, 1), padding="VALID"), norm()
        self.bn0 = norm() if stride == 1 else None

    def __call__(self, x: jax.Array) -> jax.Array:
        out = self.bn3(self.conv3(x)) + self.bn1(self.conv1(x))
        if self.bn0 is not None:
            out = out + self.bn0(x)
        return nn.relu(out)


class NnxFusedBlock(nnx.Module):
    def __init__(self, channels: int, *, stride: int, groups: int, rngs: nnx.Rngs) -> None:
        self.conv = nnx.Conv(
            channels,
            channels,
            (3, 3),
            strides=stride,
            padding=SYMMETRIC,
            feature_group_count=groups,
            rngs=rngs,
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        return nn.relu(self.conv(x))


DRAW = {  # random values by variable name, BatchNorm statistics as if after training
    "kernel": lambda rng, shape: rng.normal(0, 0.3, shape),
    "scale": lambda rng, shape: rng.uniform(0.5, 1.5, shape),
    "bias": lambda rng, shape: rng.normal(0, 0.2, shape),
    "mean": lambda rng, shape: rng.normal(0, 0.2, shape),
    "var": lambda rng, shape: rng.uniform(0.5, 2.5, shape),
}


def randomise(variables: Any, rng: np.random.Generator) -> Any:
    """The same tree of variables with random float32 values in place of the initial ones."""

    def draw(path: tuple[Any, ...], leaf: Any) -> np.ndarray:
        return np.asarray(DRAW[path[-1].key](rng, leaf.shape), np.float32)

    return jax.tree_util.tree_map_with_path(draw, variables)


def fuse(
    params: dict[str, Any], batch_stats: dict[str, Any], *, groups: int
) -> dict[str, dict[str, np.ndarray]]:
    """reparam's side: a block's ``params`` and ``batch_stats`` in, the fused ``nn.Conv``'s out.

    The input is NumPy arrays or JAX arrays alike (reparam copies them into NumPy).
    """

    def norm(name: str) -> reparam.BatchNorm:
        # A BatchNorm with use_scale=False and use_bias=False has no entry in params at all.
        return reparam.BatchNorm.from_flax(params.get(name, {}), batch_stats[name], epsilon=1e-5)

    kernel, bias = reparam.fuse_block(
        (reparam.hwio_to_oihw(params["conv3"]["kernel"]), norm("bn3")),
        (reparam.hwio_to_oihw(params["conv1"]["kernel"]), norm("bn1")),
        norm("bn0") if "bn0" in batch_stats else None,
        groups=groups,
    )
    return {"conv": {"kernel": reparam.oihw_to_hwio(kernel), "bias": bias}}


def relative_difference(actual: Any, expected: Any) -> float:
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, f"shapes {actual.shape} != {expected.shape}"
    return float(np.max(np.abs(actual - expected)) / np.max(np.abs(expected)))


def input_shape(padding: str, stride: int, size: int) -> tuple[int, int]:
    """Not square (an odd side catches transposed axes), except for "SAME" at stride 2."""
    return (size, size) if padding == "SAME" and stride == 2 else (size, size + 1)


def linen_round_trip(
    *,
    stride: int,
    groups: int,
    padding: str = "explicit",
    size: int = 8,
    seed: int = 0,
    channels: int = 8,
    affine_identity: bool = True,
) -> float:
    """One flax.linen block vs its fusion applied as one nn.Conv; the max relative difference."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((2, *input_shape(padding, stride, size), channels)).astype(np.float32)
    block = RepVGGBlock(channels, stride, groups, padding, affine_identity)
    variables = randomise(block.init(jax.random.key(0), x), rng)
    expected = block.apply(variables, x)
    fused = {"params": fuse(variables["params"], variables["batch_stats"], groups=groups)}
    actual = FusedBlock(channels, stride, groups, padding).apply(fused, x)
    return relative_difference(actual, expected)


def nnx_round_trip(*, stride: int, groups: int, size: int = 8, seed: int = 0) -> float:
    """One flax.nnx block vs its fusion loaded into one nnx.Conv; the max relative difference."""
    rng, channels = np.random.default_rng(seed), 8
    block = NnxRepVGGBlock(channels, stride=stride, groups=groups, rngs=nnx.Rngs(0))
    params, batch_stats = nnx.state(block, nnx.Param), nnx.state(block, nnx.BatchStat)
    for state in (params, batch_stats):  # random weights, as if trained
        nnx.replace_by_pure_dict(state, randomise(nnx.to_pure_dict(state), rng))
    nnx.update(block, params, batch_stats)
    deploy = NnxFusedBlock(channels, stride=stride, groups=groups, rngs=nnx.Rngs(0))
    weights = fuse(nnx.to_pure_dict(params), nnx.to_pure_dict(batch_stats), groups=groups)
    fused = nnx.state(deploy, nnx.Param)
    nnx.replace_by_pure_dict(fused, jax.tree_util.tree_map(jnp.asarray, weights))
    nnx.update(deploy, fused)
    x = jnp.asarray(rng.standard_normal((2, size, size + 1, channels)), jnp.float32)
    return relative_difference(deploy(x), block(x))


def main() -> None:
    for stride, groups in [(1, 1), (1, 4), (2, 1), (2, 4)]:
        error = linen_round_trip(stride=stride, groups=groups, seed=stride * 10 + groups)
        print(f"linen stride {stride}, groups {groups}: max relative difference {error:.2e}")
        assert error <= FLOAT32_TOLERANCE, f"linen stride {stride} groups {groups}: {error}"
    error = linen_round_trip(stride=1, groups=2, affine_identity=False)
    print(f"linen, identity BN without scale and bias: max relative difference {error:.2e}")
    assert error <= FLOAT32_TOLERANCE, f"use_scale=False, use_bias=False: {error}"
    for stride, groups in [(1, 1), (2, 4)]:
        error = nnx_round_trip(stride=stride, groups=groups, seed=stride)
        print(f"nnx stride {stride}, groups {groups}: max relative difference {error:.2e}")
        assert error <= FLOAT32_TOLERANCE, f"nnx stride {stride} groups {groups}: {error}"
    print('"SAME" padding:')
    for stride, size in [(1, 8), (2, 7), (2, 8)]:
        error = linen_round_trip(stride=stride, groups=1, padding="SAME", size=size)
        print(f"  stride {stride}, input {size}x{size}: max relative difference {error:.2e}")


if __name__ == "__main__":
    main()
