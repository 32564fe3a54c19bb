"""Keras -> reparam -> Keras: fuse RepVGG blocks built from real Keras 3 layers.

Run: ``python examples/keras_roundtrip.py`` (needs ``keras`` and ``jax``; reparam itself does
not). Keras runs on its JAX backend here (``KERAS_BACKEND=jax`` unless set otherwise).

A train-form block is ``Conv2D`` + ``BatchNormalization`` per branch, summed by ``Add``. reparam
reads the layers' ``get_weights()`` (kernels HWIO, BatchNorm ``[gamma, beta, moving_mean,
moving_variance]`` with Keras' epsilon 1e-3), fuses, and the result is written with
``set_weights`` into one ``Conv2D(use_bias=True)``; Keras runs both forms.

Padding: ``ZeroPadding2D(1)`` + ``"valid"`` on the 3x3 (and ``"valid"`` on the 1x1) pads like
the PyTorch original and fuses exactly at every stride. ``padding="same"`` is symmetric at
stride 1 but pads (0, 1) at stride 2 on an even input, so there the 1x1 branch reads the 3x3
window's corner, not its centre: the usual fused kernel is wrong (``tap="centre"``), the
corner-tap kernel is right for even inputs only (``tap="corner"``), and the fix is the explicit
padding, in the train and the deploy model alike.
"""

from __future__ import annotations

import functools
import os

os.environ.setdefault("KERAS_BACKEND", "jax")

from typing import Any

import keras
import numpy as np

import reparam

FLOAT32_TOLERANCE = 2e-5  # relative to the largest output, as in tests/tolerances.py
PADDINGS = ("explicit", "same")
TAPS = ("centre", "corner")

# A small RepVGG: (in channels, out channels, stride, groups) per block; the stem first, then
# two stages whose first block has stride 2; groups 2 on every other block after the stem.
SMALL_REPVGG = ((3, 8, 2, 1), (8, 8, 2, 2), (8, 8, 1, 1), (8, 16, 2, 2), (16, 16, 1, 1))


def conv(
    x: Any,
    filters: int,
    size: int,
    *,
    stride: int,
    groups: int,
    padding: str,
    name: str,
    use_bias: bool = False,
) -> Any:
    """A Conv2D whose padding is "same" or explicit: ZeroPadding2D(size // 2) + "valid"."""
    if padding == "explicit":
        if size > 1:
            x = keras.layers.ZeroPadding2D(size // 2, name=f"{name}_pad")(x)
        padding = "valid"
    layer = keras.layers.Conv2D(
        filters,
        size,
        strides=stride,
        padding=padding,
        groups=groups,
        use_bias=use_bias,
        name=name,
    )
    return layer(x)


def train_block(
    x: Any,
    filters: int,
    *,
    stride: int,
    groups: int,
    padding: str,
    name: str,
    affine_identity: bool = True,
) -> Any:
    """relu(BN(conv3x3(x)) + BN(conv1x1(x)) [+ BN(x)]), the identity when the shapes allow.

    ``affine_identity=False`` gives the identity BatchNorm ``scale=False, center=False``.
    """
    options = {"stride": stride, "groups": groups, "padding": padding}
    dense = conv(x, filters, 3, name=f"{name}_conv3", **options)
    branches = [
        keras.layers.BatchNormalization(name=f"{name}_bn3")(dense),
        keras.layers.BatchNormalization(name=f"{name}_bn1")(
            conv(x, filters, 1, name=f"{name}_conv1", **options)
        ),
    ]
    if stride == 1 and x.shape[-1] == filters:
        identity = keras.layers.BatchNormalization(
            scale=affine_identity, center=affine_identity, name=f"{name}_bn0"
        )
        branches.append(identity(x))
    return keras.layers.ReLU(name=f"{name}_relu")(keras.layers.Add(name=f"{name}_add")(branches))


def deploy_block(x: Any, filters: int, *, stride: int, groups: int, padding: str, name: str) -> Any:
    """relu(conv3x3(x) + b): one Conv2D with bias, padded like the train form's 3x3."""
    y = conv(
        x,
        filters,
        3,
        stride=stride,
        groups=groups,
        padding=padding,
        name=f"{name}_conv",
        use_bias=True,
    )
    return keras.layers.ReLU(name=f"{name}_relu")(y)


def build(
    form: str,
    blocks: tuple[tuple[int, int, int, int], ...],
    *,
    size: tuple[int, int],
    padding: str = "explicit",
    num_classes: int | None = None,
    affine_identity: bool = True,
) -> keras.Model:
    """A Keras model of ``blocks`` in train or deploy form, with an optional pooled linear head."""
    block: Any = deploy_block
    if form == "train":
        block = functools.partial(train_block, affine_identity=affine_identity)
    inputs = keras.Input((*size, blocks[0][0]), name="image")
    x = inputs
    for index, (_, filters, stride, groups) in enumerate(blocks):
        x = block(x, filters, stride=stride, groups=groups, padding=padding, name=f"block{index}")
    if num_classes is not None:
        x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
        x = keras.layers.Dense(num_classes, name="head")(x)
    return keras.Model(inputs, x, name=f"repvgg_{form}")


def randomise(model: keras.Model, rng: np.random.Generator, *, var_scale: float = 1.0) -> None:
    """Random weights, and BatchNorm statistics as if after training (not the init's 0 and 1)."""
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            c = layer.moving_mean.shape[0]
            values = {
                "gamma": rng.uniform(0.5, 1.5, c),
                "beta": rng.normal(0, 0.2, c),
                "moving_mean": rng.normal(0, 0.2, c),
                "moving_variance": var_scale * rng.uniform(0.5, 2.5, c),
            }
            weights = [values[w.name] for w in layer.weights]  # [gamma, beta] may be absent
        else:
            weights = [rng.normal(0, 0.3, w.shape) for w in layer.weights]
        layer.set_weights([np.asarray(w, np.float32) for w in weights])


def keras_batch_norm(layer: Any, *, epsilon: float | None = None) -> reparam.BatchNorm:
    """reparam's BatchNorm from a BatchNormalization layer, with the layer's own epsilon."""
    epsilon = layer.epsilon if epsilon is None else epsilon
    names = [w.name for w in layer.weights]  # gamma / beta are absent with scale / center=False
    return reparam.BatchNorm.from_keras(
        dict(zip(names, layer.get_weights(), strict=True)), epsilon=epsilon
    )


def fuse(
    model: keras.Model,
    name: str,
    *,
    groups: int,
    tap: str = "centre",
    epsilon: float | None = None,
) -> list[np.ndarray]:
    """A train block's layers in, ``[kernel (HWIO), bias]`` for the deploy Conv2D out.

    ``tap="centre"`` is ``reparam.fuse_block`` (symmetric padding); ``tap="corner"`` puts the
    folded 1x1 on the 3x3's top-left tap, what "same" at stride 2 on an even input computes.
    """
    (dense_kernel,) = model.get_layer(f"{name}_conv3").get_weights()
    (pointwise_kernel,) = model.get_layer(f"{name}_conv1").get_weights()
    dense = (
        reparam.hwio_to_oihw(dense_kernel),
        keras_batch_norm(model.get_layer(f"{name}_bn3"), epsilon=epsilon),
    )
    pointwise = (
        reparam.hwio_to_oihw(pointwise_kernel),
        keras_batch_norm(model.get_layer(f"{name}_bn1"), epsilon=epsilon),
    )
    names = {layer.name for layer in model.layers}
    identity = (
        keras_batch_norm(model.get_layer(f"{name}_bn0"), epsilon=epsilon)
        if f"{name}_bn0" in names
        else None
    )
    if tap == "centre":
        kernel, bias = reparam.fuse_block(dense, pointwise, identity, groups=groups)
    else:
        if identity is not None:
            raise ValueError("the corner tap is for stride-2 blocks, which have no identity")
        dense_folded = reparam.fuse_bn(*dense)
        k1, b1 = reparam.fuse_bn(*pointwise)
        corner = np.pad(k1, ((0, 0), (0, 0), (0, 2), (0, 2)))  # 1x1 -> 3x3, top-left tap
        kernel, bias = reparam.sum_branches(dense_folded, (corner, b1))
    return [reparam.oihw_to_hwio(kernel), bias]


def convert(
    train: keras.Model,
    blocks: tuple[tuple[int, int, int, int], ...],
    *,
    size: tuple[int, int],
    padding: str = "explicit",
    num_classes: int | None = None,
    tap: str = "centre",
    epsilon: float | None = None,
) -> keras.Model:
    """The deploy Keras model of ``train``: every block fused by reparam, the head copied."""
    deploy = build("deploy", blocks, size=size, padding=padding, num_classes=num_classes)
    for index, (_, _, _, groups) in enumerate(blocks):
        weights = fuse(train, f"block{index}", groups=groups, tap=tap, epsilon=epsilon)
        deploy.get_layer(f"block{index}_conv").set_weights(weights)
    if num_classes is not None:
        deploy.get_layer("head").set_weights(train.get_layer("head").get_weights())
    return deploy


def relative_difference(actual: Any, expected: Any) -> float:
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, f"shapes {actual.shape} != {expected.shape}"
    return float(np.max(np.abs(actual - expected)) / np.max(np.abs(expected)))


def block_round_trip(
    *,
    stride: int,
    groups: int,
    padding: str = "explicit",
    size: int = 8,
    seed: int = 0,
    tap: str = "centre",
    channels: int = 8,
    var_scale: float = 1.0,
    epsilon: float | None = None,
    affine_identity: bool = True,
) -> float:
    """One block, train form vs its fusion, both run by Keras; the max relative difference.

    ``var_scale`` scales the BatchNorm variances; ``epsilon`` overrides the layers' own.
    """
    rng = np.random.default_rng(seed)
    blocks = ((channels, channels, stride, groups),)
    shape = (size, size + 1)  # not square: catches swapped axes
    if padding == "same" and stride == 2:
        shape = (size, size)  # both axes padded alike, so one tap fits both
    train = build("train", blocks, size=shape, padding=padding, affine_identity=affine_identity)
    randomise(train, rng, var_scale=var_scale)
    deploy = convert(train, blocks, size=shape, padding=padding, tap=tap, epsilon=epsilon)
    x = rng.standard_normal((2, *shape, channels)).astype(np.float32)
    return relative_difference(deploy(x, training=False), train(x, training=False))


def model_round_trip(*, seed: int = 0, size: tuple[int, int] = (20, 24)) -> dict[str, Any]:
    """A whole small RepVGG with a 10-class head: train vs deploy logits, and both models."""
    rng = np.random.default_rng(seed)
    train = build("train", SMALL_REPVGG, size=size, num_classes=10)
    randomise(train, rng)
    deploy = convert(train, SMALL_REPVGG, size=size, num_classes=10)
    x = rng.standard_normal((2, *size, 3)).astype(np.float32)
    train_logits = np.asarray(train(x, training=False))
    deploy_logits = np.asarray(deploy(x, training=False))
    return {
        "train": train,
        "deploy": deploy,
        "difference": relative_difference(deploy_logits, train_logits),
    }


def main() -> None:
    cases = [
        (stride, groups, padding)
        for padding in PADDINGS
        for stride in (1, 2)
        for groups in (1, 4)
        if not (padding == "same" and stride == 2)
    ]
    for stride, groups, padding in cases:
        error = block_round_trip(stride=stride, groups=groups, padding=padding, seed=stride)
        print(f"{padding:>8} stride {stride} groups {groups}: max relative difference {error:.2e}")
        assert error <= FLOAT32_TOLERANCE, f"{padding} stride {stride} groups {groups}: {error}"
    error = block_round_trip(stride=1, groups=2, affine_identity=False)
    print(f"identity BN with scale=False, center=False: max relative difference {error:.2e}")
    assert error <= FLOAT32_TOLERANCE, f"scale=False, center=False: {error}"
    error = block_round_trip(stride=1, groups=1, var_scale=1e-2, epsilon=1e-5)
    print(f"variances ~1e-2 fused with epsilon 1e-5, not 1e-3: max relative difference {error:.2e}")
    print('"same" at stride 2, the trap:')
    for size in (8, 7):
        for tap in TAPS:
            error = block_round_trip(stride=2, groups=1, padding="same", size=size, tap=tap)
            print(
                f"  input {size}x{size}, 1x1 on the {tap} tap: max relative difference {error:.2e}"
            )
    result = model_round_trip()
    train, deploy = result["train"], result["deploy"]
    print(
        f"small RepVGG, {train.count_params()} -> {deploy.count_params()} parameters: "
        f"max relative difference {result['difference']:.2e}"
    )
    assert result["difference"] <= FLOAT32_TOLERANCE, result["difference"]


if __name__ == "__main__":
    main()
