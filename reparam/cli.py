"""The ``reparam`` command line."""

from __future__ import annotations

import argparse
import sys

import numpy as np

from .conv import conv2d
from .fusion import fuse_block
from .norm import batch_norm
from .params import BatchNorm


def _random_bn(rng: np.random.Generator, channels: int) -> BatchNorm:
    return BatchNorm(
        rng.normal(1.0, 0.5, channels),
        rng.normal(0.0, 0.5, channels),
        rng.normal(0.0, 0.5, channels),
        rng.uniform(0.5, 2.0, channels),
    )


def _demo(out: argparse.Namespace) -> int:
    rng = np.random.default_rng(0)
    channels = 8
    x = rng.standard_normal((2, channels, 16, 16))
    dense = (rng.standard_normal((channels, channels, 3, 3)), _random_bn(rng, channels))
    pointwise = (rng.standard_normal((channels, channels, 1, 1)), _random_bn(rng, channels))
    identity = _random_bn(rng, channels)
    train = (
        batch_norm(conv2d(x, dense[0], padding=1), dense[1])
        + batch_norm(conv2d(x, pointwise[0]), pointwise[1])
        + batch_norm(x, identity)
    )
    kernel, bias = fuse_block(dense, pointwise, identity)
    deploy = conv2d(x, kernel, bias, padding=1)
    difference = float(np.max(np.abs(train - deploy)))
    sys.stdout.write(
        f"one RepVGG block, {channels} channels, 3 branches -> one 3x3 conv with bias\n"
        f"max |train - deploy| = {difference:.3e} (float64)\n"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the ``reparam`` command line; return the exit code."""
    parser = argparse.ArgumentParser(prog="reparam", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("demo", help="fuse a block and show that both forms agree")
    args = parser.parse_args(argv)
    return _demo(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
