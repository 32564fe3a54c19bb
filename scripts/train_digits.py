"""Train a small RepVGG on scikit-learn's 8x8 digits and ship it inside the package.

Run from the repository root::

    .venv/bin/pip install -e ".[train]" && .venv/bin/python scripts/train_digits.py

The script is seeded and deterministic (single thread, ``torch.use_deterministic_algorithms``) and
takes well under two minutes on two CPU cores. It writes two files:

``reparam/data/digits_repvgg.npz``
    The *train-form* checkpoint (float32) with the key names of the official RepVGG PyTorch code:
    ``stage0.rbr_dense.conv.weight``, ``stage0.rbr_dense.bn.{weight,bias,running_mean,
    running_var}``, ``stage0.rbr_1x1.*``, ``stage{s}.{i}.rbr_identity.*`` (only where the identity
    branch exists), ``stage{s}.{i}.rbr_dense.*``, ``stage{s}.{i}.rbr_1x1.*`` and
    ``linear.{weight,bias}``. No ``num_batches_tracked``; convolutions have no bias; every
    BatchNorm uses ``eps = 1e-5``.
``reparam/data/digits_test.npz``
    The held-out split, preprocessed exactly as the model expects: ``images`` float32
    ``(N, 1, 16, 16)``, ``labels`` int64 ``(N,)`` and ``preprocessing``, a one-element string
    array describing the preprocessing in one sentence.

Data and preprocessing
----------------------
The 1797 digits are split 80/20 per class with ``numpy.random.default_rng(0)`` (1438 train, 359
test). Each 8x8 image (values 0-16) is upsampled 2x by nearest neighbour to 16x16, divided by 16
to lie in [0, 1], then normalised with the mean and standard deviation of the training split
(all pixels pooled): ``mean = 0.30548`` and ``std = 0.37611`` (printed by the script).

Architecture
------------
RepVGG blocks exactly as published, ``relu(BN(conv3x3(x)) + BN(conv1x1(x)) + [BN(x)])``, the
identity branch only where in == out channels and stride 1, groups 1:

- ``stage0``: 1 -> 16, stride 2 (16x16 -> 8x8);
- ``stage1``: 16 -> 32 stride 2 (8x8 -> 4x4), then 32 -> 32 stride 1 (with identity);
- ``stage2``: 32 -> 64 stride 2 (4x4 -> 2x2), then 64 -> 64 stride 1 (with identity);
- global average pool (``gap``) and ``linear`` 64 -> 10.

The stride rule: ``stage0`` and the first block of every stage have stride 2, the rest stride 1.

Training: Adam with cosine learning-rate decay, small random shifts (up to one original pixel),
then the BatchNorm running statistics are recomputed exactly (cumulative average, no
augmentation) over the training split so that they are converged, and the model is evaluated in
``eval()`` mode. Finally the saved ``.npz`` is reloaded into a fresh model with ``strict=True``
and must reproduce the logits bit for bit.

QARepVGG (``--qarepvgg``)
-------------------------
The same network, data, seed and training, with QARepVGG blocks (Chu et al., "Make RepVGG
Greater Again", AAAI 2024, as published in meituan/YOLOv6), ``relu(bn(bn_d(conv3x3(x)) +
conv1x1(x) + [x]))``: the 3x3 branch keeps its BN, the 1x1 branch and the identity have none,
and one BN follows the sum. It writes
``reparam/data/digits_qarepvgg.npz`` (float32) with YOLOv6's ``QARepVGGBlock`` keys per block:
``rbr_dense.conv.weight``, ``rbr_dense.bn.*``, ``rbr_1x1.weight`` and ``bn.*``, and the same
``linear.*``; the held-out split is checked against the shipped ``digits_test.npz`` instead of
being written. ``reparam.load`` reads it as a network of the ``qarepvgg`` layout (each block
through ``reparam.families``' ``QARepVGGBlock``, whose tree folds into one conv).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from numpy.typing import NDArray
from sklearn.datasets import load_digits  # type: ignore[import-untyped]
from torch import nn

SEED = 0
TEST_FRACTION = 0.2
NUM_CLASSES = 10
BN_EPS = 1e-5
UPSAMPLE = 2
MAX_SHIFT = 2  # pixels of the 16x16 image, i.e. one original 8x8 pixel
WIDTHS = (16, 32, 64)
DEPTHS = (1, 2, 2)  # stage0 is a single block

DATA_DIR = Path(__file__).resolve().parent.parent / "reparam" / "data"
CHECKPOINT = DATA_DIR / "digits_repvgg.npz"
QA_CHECKPOINT = DATA_DIR / "digits_qarepvgg.npz"
TEST_FILE = DATA_DIR / "digits_test.npz"


# --------------------------------------------------------------------------------------------
# Model (module names reproduce the official RepVGG state_dict keys)
# --------------------------------------------------------------------------------------------


def conv_bn(in_channels: int, out_channels: int, *, kernel_size: int, stride: int) -> nn.Sequential:
    """Return ``Sequential(conv=Conv2d(bias=False), bn=BatchNorm2d)``, as in official RepVGG."""
    branch = nn.Sequential()
    branch.add_module(
        "conv",
        nn.Conv2d(
            in_channels,
            out_channels,
            kernel_size=kernel_size,
            stride=stride,
            padding=kernel_size // 2,
            bias=False,
        ),
    )
    branch.add_module("bn", nn.BatchNorm2d(out_channels, eps=BN_EPS))
    return branch


class RepVGGBlock(nn.Module):
    """Train-form RepVGG block: ``relu(BN(conv3x3) + BN(conv1x1) + [BN(x)])``.

    Parameters
    ----------
    in_channels, out_channels : int
        Channel counts.
    stride : int
        Stride of both convolutions; the identity branch exists only for stride 1 and
        ``in_channels == out_channels``.
    """

    def __init__(self, in_channels: int, out_channels: int, *, stride: int) -> None:
        super().__init__()
        has_identity = in_channels == out_channels and stride == 1
        # Attribute order follows the official code, so state_dict() lists keys in its order.
        self.rbr_identity: nn.BatchNorm2d | None = (
            nn.BatchNorm2d(in_channels, eps=BN_EPS) if has_identity else None
        )
        self.rbr_dense = conv_bn(in_channels, out_channels, kernel_size=3, stride=stride)
        self.rbr_1x1 = conv_bn(in_channels, out_channels, kernel_size=1, stride=stride)
        self.nonlinearity = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the block to ``x`` of shape (N, C_in, H, W)."""
        out = self.rbr_dense(x) + self.rbr_1x1(x)
        if self.rbr_identity is not None:
            out = out + self.rbr_identity(x)
        return torch.relu(out)


class QARepVGGBlock(nn.Module):
    """Train-form QARepVGG block: ``relu(bn(BN(conv3x3) + conv1x1 + [x]))`` (YOLOv6's keys).

    Parameters
    ----------
    in_channels, out_channels : int
        Channel counts.
    stride : int
        Stride of both convolutions; the identity exists only for stride 1 and
        ``in_channels == out_channels``.
    """

    def __init__(self, in_channels: int, out_channels: int, *, stride: int) -> None:
        super().__init__()
        self.has_identity = in_channels == out_channels and stride == 1
        self.rbr_dense = conv_bn(in_channels, out_channels, kernel_size=3, stride=stride)
        self.rbr_1x1 = nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False)
        self.bn = nn.BatchNorm2d(out_channels, eps=BN_EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the block to ``x`` of shape (N, C_in, H, W)."""
        out = self.rbr_dense(x) + self.rbr_1x1(x)
        if self.has_identity:
            out = out + x
        return torch.relu(self.bn(out))


BlockType = type[RepVGGBlock] | type[QARepVGGBlock]


def make_stage(in_channels: int, out_channels: int, depth: int, block: BlockType) -> nn.Sequential:
    """Return ``depth`` blocks; the first has stride 2, the rest stride 1."""
    blocks = [block(in_channels, out_channels, stride=2)]
    blocks += [block(out_channels, out_channels, stride=1) for _ in range(depth - 1)]
    return nn.Sequential(*blocks)


class DigitsRepVGG(nn.Module):
    """RepVGG with ``stage0`` (1 -> 16), ``stage1`` (2 blocks, 32), ``stage2`` (2 blocks, 64).

    ``block`` is :class:`RepVGGBlock` (the default) or :class:`QARepVGGBlock`.
    """

    def __init__(self, block: BlockType = RepVGGBlock) -> None:
        super().__init__()
        self.stage0 = block(1, WIDTHS[0], stride=2)
        self.stage1 = make_stage(WIDTHS[0], WIDTHS[1], DEPTHS[1], block)
        self.stage2 = make_stage(WIDTHS[1], WIDTHS[2], DEPTHS[2], block)
        self.gap = nn.AdaptiveAvgPool2d(output_size=1)
        self.linear = nn.Linear(WIDTHS[2], NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return logits (N, 10) for images ``x`` of shape (N, 1, 16, 16)."""
        out = self.stage2(self.stage1(self.stage0(x)))
        logits: torch.Tensor = self.linear(torch.flatten(self.gap(out), 1))
        return logits


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


def stratified_split(
    labels: NDArray[np.int64], *, fraction: float, seed: int
) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    """Return sorted (train, test) indices, ``fraction`` of each class going to test."""
    rng = np.random.default_rng(seed)
    test_parts = []
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        test_parts.append(members[: round(fraction * members.size)])
    test = np.sort(np.concatenate(test_parts))
    train = np.setdiff1d(np.arange(labels.size), test)
    return train.astype(np.int64), test.astype(np.int64)


def upsample_unit(images: NDArray[np.float64]) -> NDArray[np.float32]:
    """Map 8x8 images (N, 8, 8) in 0..16 to (N, 1, 16, 16) in [0, 1] (nearest neighbour)."""
    big = images.repeat(UPSAMPLE, axis=1).repeat(UPSAMPLE, axis=2) / 16.0
    return big[:, None, :, :].astype(np.float32)


def random_shift(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Shift each image by up to ``MAX_SHIFT`` pixels per axis, filling with 0 (background)."""
    n, _, h, w = x.shape
    padded = nn.functional.pad(x, (MAX_SHIFT,) * 4)
    offsets = torch.randint(0, 2 * MAX_SHIFT + 1, (n, 2), generator=generator).tolist()
    return torch.stack(
        [padded[i, :, dy : dy + h, dx : dx + w] for i, (dy, dx) in enumerate(offsets)]
    )


# --------------------------------------------------------------------------------------------
# Training and evaluation
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Return eval-mode logits (N, 10)."""
    model.eval()
    return torch.cat([model(images[i : i + batch_size]) for i in range(0, len(images), batch_size)])


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of rows whose arg-max equals the label."""
    return float((logits.argmax(dim=1) == labels).float().mean())


@torch.no_grad()
def recompute_bn_stats(model: nn.Module, images: torch.Tensor, batch_size: int) -> None:
    """Set every BN's running mean/var to the exact average over ``images`` (precise BN)."""
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative moving average over all batches seen
    model.train()
    for i in range(0, len(images), batch_size):
        model(images[i : i + batch_size])
    model.eval()


def train(
    model: nn.Module,
    images01: torch.Tensor,
    labels: torch.Tensor,
    *,
    mean: float,
    std: float,
    epochs: int,
    batch_size: int,
    lr: float,
) -> None:
    """Train with Adam, cosine decay, label smoothing and random shifts (in place)."""
    generator = torch.Generator().manual_seed(SEED)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=1e-4)
    steps = epochs * ((len(images01) + batch_size - 1) // batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=0.05)
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(images01), generator=generator)
        total = 0.0
        for i in range(0, len(order), batch_size):
            idx = order[i : i + batch_size]
            x = (random_shift(images01[idx], generator) - mean) / std
            loss = loss_fn(model(x), labels[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            total += loss.item() * len(idx)
        if epoch % 10 == 9 or epoch == epochs - 1:
            print(f"epoch {epoch + 1:3d}  loss {total / len(order):.4f}")


# --------------------------------------------------------------------------------------------
# Export and verification
# --------------------------------------------------------------------------------------------


def to_numpy_state(model: nn.Module) -> dict[str, NDArray[np.float32]]:
    """Return the state_dict as float32 arrays, without ``num_batches_tracked``."""
    return {
        key: value.detach().cpu().numpy().astype(np.float32)
        for key, value in model.state_dict().items()
        if not key.endswith("num_batches_tracked")
    }


def reload_checkpoint(path: Path, block: BlockType = RepVGGBlock) -> DigitsRepVGG:
    """Load ``path`` into a fresh model with ``strict=True``.

    The checkpoint has no ``num_batches_tracked`` (it never affects eval-mode outputs); those
    buffers are taken from the fresh model so that every other key is checked strictly.
    """
    model = DigitsRepVGG(block)
    with np.load(path) as data:
        state = {key: torch.from_numpy(data[key]) for key in data.files}
    expected = {k for k in model.state_dict() if not k.endswith("num_batches_tracked")}
    if set(state) != expected:
        raise SystemExit(f"key mismatch: {sorted(set(state) ^ expected)}")
    state.update({k: v for k, v in model.state_dict().items() if k.endswith("num_batches_tracked")})
    model.load_state_dict(state, strict=True)
    return model.eval()


def main() -> None:
    """Train, export the checkpoint and the test split, and verify the round trip."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument(
        "--qarepvgg",
        action="store_true",
        help="train QARepVGG blocks and write digits_qarepvgg.npz (the test split is checked)",
    )
    args = parser.parse_args()
    block: BlockType = QARepVGGBlock if args.qarepvgg else RepVGGBlock
    checkpoint = QA_CHECKPOINT if args.qarepvgg else CHECKPOINT

    torch.manual_seed(SEED)
    np.random.seed(SEED)  # noqa: NPY002 - nothing uses the global state; set for safety
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    start = time.perf_counter()

    digits = load_digits()
    labels_all = digits.target.astype(np.int64)
    train_idx, test_idx = stratified_split(labels_all, fraction=TEST_FRACTION, seed=SEED)
    images01 = upsample_unit(digits.images)
    mean = float(images01[train_idx].mean(dtype=np.float64))
    std = float(images01[train_idx].std(dtype=np.float64))
    print(f"train {train_idx.size}, test {test_idx.size}; mean {mean:.5f}, std {std:.5f}")

    def normalise(x: NDArray[np.float32]) -> NDArray[np.float32]:
        return ((x - np.float32(mean)) / np.float32(std)).astype(np.float32)

    x_train01 = torch.from_numpy(images01[train_idx])
    x_train = torch.from_numpy(normalise(images01[train_idx]))
    y_train = torch.from_numpy(labels_all[train_idx])
    test_images = normalise(images01[test_idx])
    test_labels = labels_all[test_idx]
    x_test = torch.from_numpy(test_images)
    y_test = torch.from_numpy(test_labels)

    model = DigitsRepVGG(block)
    train(
        model,
        x_train01,
        y_train,
        mean=mean,
        std=std,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
    )
    recompute_bn_stats(model, x_train, batch_size=args.batch_size)
    train_time = time.perf_counter() - start

    train_acc = accuracy(predict(model, x_train), y_train)
    logits = predict(model, x_test)
    test_acc = accuracy(logits, y_test)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"train accuracy {train_acc:.4f}, test accuracy {test_acc:.4f} (eval mode)")
    print(f"parameters {n_params} (conv + BN gamma/beta + linear), time {train_time:.1f} s")

    DATA_DIR.mkdir(parents=True, exist_ok=True)
    state = to_numpy_state(model)
    np.savez(checkpoint, **state)  # type: ignore[arg-type]
    sentence = (
        "8x8 sklearn digits (0-16) upsampled 2x by nearest neighbour to 16x16, divided by 16, "
        f"then normalised with the training-split mean {mean:.5f} and std {std:.5f}"
    )
    if not args.qarepvgg:  # the QARepVGG model shares the split, which is checked below
        # Compressed: the upsampled images repeat each value 4 times and take 17 distinct values.
        np.savez_compressed(
            TEST_FILE, images=test_images, labels=test_labels, preprocessing=np.array([sentence])
        )

    reloaded = reload_checkpoint(checkpoint, block)
    logits_reloaded = predict(reloaded, x_test)
    if not torch.equal(logits, logits_reloaded):
        raise SystemExit("reloaded checkpoint gives different logits")
    with np.load(TEST_FILE) as data:
        same = np.array_equal(data["images"], test_images) and np.array_equal(
            data["labels"], test_labels
        )
        if not (same and data["labels"].dtype == np.int64):
            raise SystemExit("test file does not round-trip")
    print(
        f"reloaded (strict=True): test accuracy {accuracy(logits_reloaded, y_test):.4f}, "
        "logits identical"
    )
    print(f"{len(state)} keys, first: {', '.join(list(state)[:3])}")
    for path in (checkpoint, TEST_FILE):
        print(f"{path.name}: {path.stat().st_size} bytes")


if __name__ == "__main__":
    main()
