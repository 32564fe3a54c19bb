"""fold_graph on random graphs: the folded graph computes what the train graph computes.

Graphs are drawn by construction (tests/graph_reference.Builder): a chain of random
*blocks*, each a sum of one to three branches on a tensor drawn from those computed so
far (so tensors are shared across regions), every branch a random chain of affine ops
with the block's stride (a pointwise prefix, a windowed map with pads that keep the
branches' output sizes equal, a BatchNorm, a scale, a negation, sometimes a ReLU inside),
the sum sometimes followed by a BatchNorm or a constant; between blocks a nonlinearity,
a residual sum of two earlier tensors, or a gate multiplying two; earlier tensors become
extra graph outputs. Compared in float64 and float32 with the NumPy interpreter, relative
to the largest magnitude of any tensor (the graph run on absolute values), which bounds
what floating-point error is proportional to.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from graph_reference import Builder, run
from hypothesis import given
from hypothesis import strategies as st
from tolerances import DTYPES, assert_close

from reparam.graph import Graph, fold_graph


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@st.composite
def branch(draw: st.DrawFn, b: Builder, x: str, channels: int, stride: int) -> str:
    """One branch on ``x``: output (channels, ceil(H / stride), ceil(W / stride))."""
    t = x
    if draw(st.booleans()):  # a pointwise prefix: 1x1 conv, maybe BN, maybe a ReLU
        t = b.conv(t, channels, channels, 1, groups=draw(st.sampled_from(_divisors(channels))))
        if draw(st.booleans()):
            t = b.bn(t, channels)
        if draw(st.integers(0, 4)) == 0:
            t = b.unary("opaque", t, "Relu")
    kinds = ["conv", "conv", "pool"] + (["identity"] if stride == 1 else [])
    kind = draw(st.sampled_from(kinds))
    if kind == "conv":
        k = draw(st.sampled_from([1, 2, 3, 5]))
        rate = draw(st.sampled_from([1, 1, 2])) if k > 1 else 1
        span = rate * (k - 1)
        before = draw(st.integers(0, span))
        groups = draw(st.sampled_from(_divisors(channels)))
        weight = b.rng.standard_normal((channels, channels // groups, k, k))
        name = b._const(weight)
        t = b._add(
            "conv", (t, name), "Conv", stride=(stride, stride),
            pads=((before, span - before), (before, span - before)), groups=groups,
            dilation=(rate, rate),
        )  # fmt: skip
    elif kind == "pool":
        k = draw(st.sampled_from([1, 2, 3]))
        before = draw(st.integers(0, k - 1))
        t = b.unary(
            "avg_pool", t, "AveragePool", size=(k, k), stride=(stride, stride),
            pads=((before, k - 1 - before),) * 2, count_include_pad=True,
        )  # fmt: skip
    after = draw(st.sampled_from(["", "bn", "bn", "mul", "neg", "div"]))
    if after == "bn":
        t = b.bn(t, channels)
    elif after in ("mul", "div"):
        shape = draw(st.sampled_from([(), (channels, 1, 1), (1, channels, 1, 1)]))
        value = b.rng.uniform(0.5, 2.0, shape) * b.rng.choice([-1.0, 1.0], shape)
        t = b.by_constant(after, t, value)
    elif after == "neg":
        t = b.unary("neg", t, "Neg")
    return t


@st.composite
def random_graphs(draw: st.DrawFn, dtype: Any) -> tuple[Graph, int]:
    per_group = draw(st.integers(1, 2))
    channels = per_group * draw(st.integers(1, 3))
    b = Builder(draw(st.integers(0, 2**32 - 1)), dtype)
    pool = [("in", 0)]  # (tensor, number of stride-2 steps behind it)
    for _ in range(draw(st.integers(1, 4))):
        step = draw(st.sampled_from(["block", "block", "block", "act", "residual", "gate"]))
        x, depth = draw(st.sampled_from(pool))
        if step == "block":
            stride = draw(st.sampled_from([1, 1, 2])) if depth < 1 else 1
            count = draw(st.integers(1, 3))
            parts = [draw(branch(b, x, channels, stride)) for _ in range(count)]
            t = parts[0]
            for part in parts[1:]:
                t = b.binary(draw(st.sampled_from(["add", "add", "sub"])), t, part)
            tail = draw(st.sampled_from(["", "bn", "bias", "relu", "relu"]))
            if tail == "bn":
                t = b.bn(t, channels)
            elif tail == "bias":
                t = b.by_constant("add", t, b.rng.standard_normal((channels, 1, 1)))
            elif tail == "relu":
                t = b.unary("opaque", t, "Relu")
            pool.append((t, depth + (stride == 2)))
            continue
        if step == "act":
            pool.append((b.unary("opaque", x, draw(st.sampled_from(["Relu", "Sigmoid"]))), depth))
            continue
        same = [t for t, d in pool if d == depth]
        other = draw(st.sampled_from(same))
        kind = "add" if step == "residual" else "mul"
        if kind == "add":
            pool.append((b.binary("add", x, other), depth))
        else:
            pool.append((b._add("opaque", (x, other), "Mul"), depth))
    last = pool[-1][0]
    extra = draw(st.lists(st.sampled_from([t for t, _ in pool[1:-1]] or [last]), max_size=2))
    outputs = tuple(dict.fromkeys([last, *extra]))
    return b.graph(("in",), outputs), channels


def check(graph: Graph, channels: int, dtype: Any, ratio: float) -> None:
    folded, report = fold_graph(graph, max_cost_ratio=ratio)
    assert report.ops_after <= report.ops_before, f"ops grew: {report}"
    assert len(folded.ops) == report.ops_after, "the report miscounts the ops"
    x = np.random.default_rng(1).standard_normal((2, channels, 7, 6)).astype(dtype)
    expected, actual = run(graph, x), run(folded, x)
    scale = max(float(np.max(v)) for v in run(graph, x, absolute=True).values())
    for name in graph.outputs:
        assert_close(
            actual[name], expected[name], dtype=dtype, scale=scale, what=f"{name}\n{report}"
        )


@given(st.data())
def test_random_graphs_fold_to_the_same_function(data: st.DataObject) -> None:
    dtype = data.draw(st.sampled_from(DTYPES))
    graph, channels = data.draw(random_graphs(dtype))
    check(graph, channels, dtype, data.draw(st.sampled_from([1.0, float("inf")])))
