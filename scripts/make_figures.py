"""Draw the figures of the docs into docs/figures/ (deterministic; matplotlib, Agg backend).

Run from anywhere: ``.venv/bin/python scripts/make_figures.py``. Needs the ``docs`` extra.
The numbers in ``branch_kernels.png`` are the worked example of docs/branches.md, computed
here with the library itself, so the picture shows what the doctest prints.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.axes import Axes
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch, Rectangle

from reparam import BatchNorm, fuse_bn, identity_kernel, pad_kernel, sum_branches
from reparam.graph.fold import fold_graph
from reparam.graph.ir import Graph, Op

FIGURES = Path(__file__).resolve().parent.parent / "docs" / "figures"
DPI = 110
# Fixed metadata keeps the PNG bytes identical from run to run.
PNG_METADATA = {"Software": None}
plt.rcParams.update({"font.size": 10, "figure.dpi": DPI})


def branch_example() -> dict[str, np.ndarray]:
    """The worked example of docs/branches.md: two channels, integer weights."""
    rng = np.random.default_rng(7)
    dense_w = rng.integers(-3, 4, size=(2, 2, 3, 3)).astype(float)
    point_w = rng.integers(-3, 4, size=(2, 2, 1, 1)).astype(float)
    dense_bn = BatchNorm([1.0, 2.0], [0.5, 0.0], [1.0, -1.0], [4.0, 1.0], eps=0.0)
    point_bn = BatchNorm([2.0, 1.0], [0.0, 1.0], [0.5, 0.0], [1.0, 4.0], eps=0.0)
    identity_bn = BatchNorm([1.5, 1.0], [0.0, -0.5], [1.0, 0.0], [1.0, 1.0], eps=0.0)
    dense = fuse_bn(dense_w, dense_bn)
    small_kernel, small_bias = fuse_bn(point_w, point_bn)
    point = (pad_kernel(small_kernel, 3), small_bias)
    ident = fuse_bn(identity_kernel(2, size=3), identity_bn)
    total = sum_branches(dense, point, ident)
    return {
        "3x3 conv + BN": dense,
        "1x1 conv + BN, padded": point,
        "identity BN": ident,
        "sum = deploy kernel": total,
    }


def draw_heatmap(ax: Axes, values: np.ndarray, *, limit: float, title: str) -> None:
    """A 3x3 heatmap with each value written in its cell."""
    ax.imshow(values, cmap="RdBu_r", vmin=-limit, vmax=limit)
    for (row, col), value in np.ndenumerate(values):
        shade = abs(value) > 0.6 * limit
        ax.text(
            col,
            row,
            f"{value:g}",
            ha="center",
            va="center",
            fontsize=12,
            color="white" if shade else "black",
        )
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title, fontsize=10)


def figure_branch_kernels() -> None:
    branches = branch_example()
    limit = max(float(np.abs(kernel[0, 0]).max()) for kernel, _ in branches.values())
    fig, axes = plt.subplots(1, 7, figsize=(10.5, 2.6), width_ratios=[4, 1, 4, 1, 4, 1, 4])
    panels = axes[0::2]
    for ax in axes[1::2]:
        ax.axis("off")
    for ax, symbol in zip(axes[1::2], ["+", "+", "="], strict=True):
        ax.text(0.5, 0.5, symbol, ha="center", va="center", fontsize=22)
    for ax, (name, (kernel, bias)) in zip(panels, branches.items(), strict=True):
        draw_heatmap(ax, kernel[0, 0], limit=limit, title=f"{name}\nbias {bias[0]:g}")
    fig.suptitle(
        "Output channel 0, input channel 0: the three folded branches and their sum",
        fontsize=11,
    )
    fig.tight_layout(rect=(0, 0, 1, 0.9))
    fig.savefig(FIGURES / "branch_kernels.png", metadata=PNG_METADATA)
    plt.close(fig)


def figure_grouped_identity() -> None:
    channels = 8
    fig, axes = plt.subplots(2, 4, figsize=(10, 6.2), layout="constrained")
    for col, groups in enumerate((1, 2, 4, 8)):
        per_group = channels // groups
        centre = identity_kernel(channels, groups=groups, size=3)[:, :, 1, 1]
        dense = np.zeros((channels, channels))
        for out in range(channels):
            first = (out // per_group) * per_group
            dense[out, first : first + per_group] = centre[out]
        top, bottom = axes[0, col], axes[1, col]
        top.imshow(dense, cmap="Greys", vmin=0, vmax=1.6)
        for group in range(groups):
            start = group * per_group - 0.5
            top.add_patch(
                Rectangle(
                    (start, start),
                    per_group,
                    per_group,
                    fill=True,
                    facecolor="tab:blue",
                    alpha=0.18,
                    edgecolor="tab:blue",
                    linewidth=1.5,
                )
            )
        top.set_title(f"g = {groups}: C/g = {per_group}\nas a dense 8x8 map", fontsize=10)
        top.set_xlabel("input channel")
        top.set_ylabel("output channel i")
        bottom.imshow(centre, cmap="Greys", vmin=0, vmax=1.6, aspect="equal")
        bottom.set_xlim(-0.5, channels - 0.5)
        bottom.set_title(f"stored K[:, :, 1, 1], shape (8, {per_group})", fontsize=10)
        bottom.set_xlabel("local input channel i mod (C/g)")
        bottom.set_ylabel("output channel i")
        for ax in (top, bottom):
            ax.set_xticks(range(0, channels))
            ax.set_yticks(range(0, channels))
            ax.tick_params(labelsize=7, length=0)
        bottom.set_xticks(range(per_group))
    fig.suptitle(
        "Identity kernel of 8 channels: a one at K[i, i mod (C/g), 1, 1]; shaded = group blocks",
        fontsize=11,
    )
    fig.savefig(FIGURES / "grouped_identity.png", metadata=PNG_METADATA)
    plt.close(fig)


def _box(ax: Axes, centre: tuple[float, float], text: str, colour: str) -> None:
    width, height = 2.3, 0.62
    x, y = centre
    ax.add_patch(
        FancyBboxPatch(
            (x - width / 2, y - height / 2),
            width,
            height,
            boxstyle="round,pad=0.04,rounding_size=0.12",
            facecolor=colour,
            edgecolor="black",
            linewidth=1.0,
        )
    )
    ax.text(x, y, text, ha="center", va="center", fontsize=10)


def _arrow(ax: Axes, start: tuple[float, float], end: tuple[float, float]) -> None:
    ax.add_patch(FancyArrowPatch(start, end, arrowstyle="-|>", mutation_scale=12, linewidth=1.0))


def figure_block_diagram() -> None:
    fig, (train, deploy) = plt.subplots(1, 2, figsize=(10, 4.6), width_ratios=[3, 1.6])
    conv, norm, act = "#cfe2f3", "#fce5cd", "#d9ead3"
    # train form
    _box(train, (4, 6), "x  (N, C, H, W)", "white")
    columns = (1.3, 4, 6.7)
    _box(train, (columns[0], 4.6), "3x3 conv, pad 1", conv)
    _box(train, (columns[0], 3.6), "BatchNorm", norm)
    _box(train, (columns[1], 4.6), "1x1 conv, pad 0", conv)
    _box(train, (columns[1], 3.6), "BatchNorm", norm)
    _box(train, (columns[2], 3.6), "BatchNorm", norm)
    train.add_patch(plt.Circle((4, 2.1), 0.3, facecolor="white", edgecolor="black"))
    train.text(4, 2.1, "+", ha="center", va="center", fontsize=16)
    _box(train, (4, 0.9), "ReLU", act)
    for x in columns:
        top = 4.6 + 0.31 if x != columns[2] else 3.6 + 0.31
        _arrow(train, (4 + (x - 4) * 0.25, 6 - 0.31), (x, top))
        if x != columns[2]:
            _arrow(train, (x, 4.6 - 0.31), (x, 3.6 + 0.31))
        _arrow(train, (x, 3.6 - 0.31), (4 + (x - 4) * 0.09, 2.1 + 0.28))
    _arrow(train, (4, 2.1 - 0.3), (4, 0.9 + 0.31))
    train.text(
        7.05,
        2.65,
        "identity: only if\nC_in = C_out, stride 1",
        ha="center",
        fontsize=8.5,
        style="italic",
    )
    train.set_title("train form: three branches, 3 BatchNorms", fontsize=11)
    # deploy form
    _box(deploy, (1.5, 6), "x  (N, C, H, W)", "white")
    _box(deploy, (1.5, 3.6), "3x3 conv + bias\npad 1", conv)
    _box(deploy, (1.5, 0.9), "ReLU", act)
    _arrow(deploy, (1.5, 6 - 0.31), (1.5, 3.6 + 0.31))
    _arrow(deploy, (1.5, 3.6 - 0.31), (1.5, 0.9 + 0.31))
    deploy.set_title("deploy form: one conv\n(W, b = fuse_block(...))", fontsize=11)
    train.set_xlim(-0.1, 8.1)
    deploy.set_xlim(0, 3)
    for ax in (train, deploy):
        ax.set_ylim(0.3, 6.6)
        ax.set_aspect("equal")
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(FIGURES / "block_diagram.png", metadata=PNG_METADATA)
    plt.close(fig)


def graph_example() -> Graph:
    """The graph of docs/graph.md: a RepVGG block, then a block with a ReLU inside a branch."""
    rng = np.random.default_rng(3)
    constants: dict[str, np.ndarray] = {}
    ops: list[Op] = []
    channels = 4

    def const(name: str, value: np.ndarray) -> str:
        constants[name] = value
        return name

    def conv(name: str, x: str, k: int) -> str:
        weight = const(f"{name}.weight", rng.standard_normal((channels, channels, k, k)))
        pads = ((k // 2, k // 2), (k // 2, k // 2))
        attrs = {"stride": (1, 1), "pads": pads, "groups": 1, "dilation": (1, 1)}
        ops.append(Op(name, "conv", (x, weight), (name,), attrs, label=f"Conv {k}x{k}"))
        return name

    def bn(name: str, x: str) -> str:
        stats = [rng.uniform(0.5, 2, channels), rng.standard_normal(channels),
                 rng.standard_normal(channels), rng.uniform(0.5, 2, channels)]  # fmt: skip
        inputs = (x, *(const(f"{name}.{i}", v) for i, v in enumerate(stats)))
        ops.append(Op(name, "batch_norm", inputs, (name,), {"eps": 1e-5}, label="BN"))
        return name

    def node(name: str, kind: str, inputs: tuple[str, ...], label: str) -> str:
        ops.append(Op(name, kind, inputs, (name,), label=label))
        return name

    a = bn("b1/bn3", conv("b1/conv3", "x", 3))
    b = bn("b1/bn1", conv("b1/conv1", "x", 1))
    s = node("b1/add2", "add", (node("b1/add", "add", (a, b), "Add"), bn("b1/bn0", "x")), "Add")
    y = node("b1/relu", "opaque", (s,), "Relu")
    inner = node("b2/act", "opaque", (bn("b2/bn1", conv("b2/conv1", y, 1)),), "Relu")
    c = bn("b2/bn3", conv("b2/conv3", inner, 3))
    d = bn("b2/bnb", conv("b2/convb", y, 1))
    out = node("b2/relu", "opaque", (node("b2/add", "add", (c, d), "Add"),), "Relu")
    return Graph(tuple(ops), ("x",), (out,), constants)


def _draw_graph(ax: Axes, graph: Graph, shade: dict[str, str], title: str, rows_shown: int) -> None:
    """Draw a DAG top to bottom: each op at the depth of its longest path from the input."""
    producers = graph.producers()
    depth: dict[str, int] = {}
    for op in graph.ops:  # the ops are in topological order
        depth[op.name] = 1 + max(
            (depth[producers[t].name] for t in op.inputs if t in producers), default=0
        )
    rows: dict[int, list[Op]] = {}
    for op in graph.ops:
        rows.setdefault(depth[op.name], []).append(op)
    where = {"x": (0.0, 0.0)}
    _box(ax, (0.0, 0.0), "input", "white")
    for level, members in rows.items():
        for i, op in enumerate(members):
            centre = (2.6 * (i - (len(members) - 1) / 2), -1.1 * level)
            where[op.outputs[0]] = centre
            kernel = op.attrs.get("kernel_shape")
            text = f"Conv {kernel[2]}x{kernel[3]}" if kernel else op.label
            _box(ax, centre, text, shade.get(op.name, "white"))
    for op in graph.ops:
        end = where[op.outputs[0]]
        for tensor in op.inputs:
            if tensor in where:
                start = where[tensor]
                _arrow(ax, (start[0], start[1] - 0.31), (end[0], end[1] + 0.31))
    ax.set_title(title, fontsize=11)
    ax.set_xlim(-4.6, 4.6)
    ax.set_ylim(-1.1 * rows_shown - 0.6, 0.6)
    ax.set_aspect("equal")
    ax.axis("off")


def figure_graph_fold() -> None:
    graph = graph_example()
    folded, report = fold_graph(graph)
    region_colours = ["#cfe2f3", "#fce5cd", "#d9ead3", "#ead1dc"]
    before: dict[str, str] = {}
    after: dict[str, str] = {}
    for region, colour in zip(report.folded, region_colours, strict=False):
        before.update(dict.fromkeys(region.replaced, colour))
        after[region.conv.name] = colour
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 7.2), width_ratios=[1, 1])
    rows = 12
    _draw_graph(left, graph, before, f"train form: {report.ops_before} ops", rows)
    _draw_graph(right, folded, after, f"after fold_graph: {report.ops_after} ops", rows)
    fig.tight_layout()
    fig.savefig(FIGURES / "graph_fold.png", metadata=PNG_METADATA)
    plt.close(fig)


def main() -> None:
    FIGURES.mkdir(parents=True, exist_ok=True)
    figure_branch_kernels()
    figure_grouped_identity()
    figure_block_diagram()
    figure_graph_fold()
    for path in sorted(FIGURES.glob("*.png")):
        print(f"{path.name}: {path.stat().st_size / 1024:.0f} KB")


if __name__ == "__main__":
    main()
