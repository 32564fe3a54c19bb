"""The region finder (reparam.graph.fold) on IR graphs, checked with a NumPy interpreter.

Each case builds a graph op by op (tests/graph_reference.py), folds it, and
checks (1) the folded graph computes what the train graph computes, relative to
the magnitude of the summed terms, in float64 and float32; (2) the ops left, by
kind, counted by hand for that structure and written into the test; (3) the
report's reasons where a region stops.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from graph_reference import Builder, run
from tolerances import DTYPES, assert_close

from reparam import ReparamError
from reparam.graph import Graph, Op, fold_graph

C = 4


def check_same(graph: Graph, folded: Graph, dtype: npt.DTypeLike, *, seed: int = 0) -> None:
    x = np.random.default_rng(seed).standard_normal((2, C, 9, 10)).astype(dtype)
    expected = run(graph, x)
    actual = run(folded, x)
    scale = max(float(np.max(v)) for v in run(graph, x, absolute=True).values())
    for name in graph.outputs:
        assert actual[name].dtype == expected[name].dtype, f"{name}: dtype changed"
        assert_close(actual[name], expected[name], dtype=dtype, scale=scale, what=name)


def kinds(graph: Graph) -> Counter[str]:
    return Counter(op.label or op.kind for op in graph.ops)


def repvgg_block(b: Builder, x: str, *, identity: bool = True) -> str:
    s = b.binary("add", b.bn(b.conv(x, C, C, 3), C), b.bn(b.conv(x, C, C, 1), C))
    return b.binary("add", s, b.bn(x, C)) if identity else s


@pytest.mark.parametrize("dtype", DTYPES)
def test_repvgg_blocks_between_relus_fold_to_one_conv_each(dtype: Any) -> None:
    b = Builder(0, dtype)
    x = b.unary("opaque", "in", "Relu")
    y = b.unary("opaque", repvgg_block(b, x), "Relu")
    out = b.unary("opaque", repvgg_block(b, y), "Relu")
    graph = b.graph(("in",), (out,))
    folded, report = fold_graph(graph)
    assert kinds(folded) == {"Relu": 3, "Conv": 2}, kinds(folded)
    assert len(report.folded) == 2 and report.ops_before == 17 and report.ops_after == 5
    assert {c.dtype for c in folded.constants.values()} == {np.dtype(dtype)}
    check_same(graph, folded, dtype)


def test_constants_are_never_written_and_unused_ones_dropped() -> None:
    b = Builder(1)
    out = b.unary("opaque", repvgg_block(b, b.unary("opaque", "in", "Relu")), "Relu")
    graph = b.graph(("in",), (out,))
    before = {name: value.copy() for name, value in graph.constants.items()}
    folded, _ = fold_graph(graph)
    for name, value in graph.constants.items():
        np.testing.assert_array_equal(value, before[name], err_msg=f"{name} was modified")
    used = {t for op in folded.ops for t in op.inputs}
    assert set(folded.constants) == used & set(folded.constants) and len(folded.constants) == 2


@pytest.mark.parametrize("dtype", DTYPES)
def test_users_blocks_scaled_negated_and_repmixer(dtype: Any) -> None:
    b = Builder(2, dtype)
    x = b.unary("opaque", "in", "Relu")
    gamma = b.rng.uniform(0.5, 1.5, (C, 1, 1))
    # x + gamma * (mixer(x) - norm(x)), mixer = BN(dw3x3) + BN(dw1x1) + BN(x)
    mixer = b.binary(
        "add",
        b.binary(
            "add", b.bn(b.conv(x, C, C, 3, groups=C), C), b.bn(b.conv(x, C, C, 1, groups=C), C)
        ),
        b.bn(x, C),
    )
    mixed = b.by_constant("mul", b.binary("sub", mixer, b.bn(x, C)), gamma, first=False)
    y = b.unary("opaque", b.binary("add", x, mixed), "Relu")
    # alpha * bn(conv3(y)) - bn(conv5(y)) / 2 + 0.5, negated
    branch = b.by_constant("mul", b.bn(b.conv(y, C, C, 3), C), np.asarray(1.7))
    other = b.by_constant("div", b.bn(b.conv(y, C, C, 5), C), np.asarray(2.0))
    z = b.unary("neg", b.by_constant("sub", b.binary("sub", branch, other), np.asarray(0.5)), "Neg")
    out = b.unary("opaque", z, "Relu")
    graph = b.graph(("in",), (out,))
    folded, report = fold_graph(graph)
    assert kinds(folded) == {"Relu": 3, "Conv": 2}, report
    check_same(graph, folded, dtype)


def test_residual_around_a_nonlinear_block_folds_the_convs_and_keeps_the_add() -> None:
    b = Builder(3)
    x = b.unary("opaque", "in", "Relu")
    h = b.unary("opaque", b.bn(b.conv(x, C, C, 3), C), "Relu")
    out = b.binary("add", x, b.bn(b.conv(h, C, C, 3), C))
    graph = b.graph(("in",), (out,))
    folded, _ = fold_graph(graph)
    assert kinds(folded) == {"Relu": 2, "Conv": 2, "Add": 1}, kinds(folded)
    check_same(graph, folded, np.float64)


def test_a_tensor_read_outside_splits_the_region_there() -> None:
    b = Builder(4)
    x = b.unary("opaque", "in", "Relu")
    t = b.bn(b.conv(x, C, C, 1), C)  # read by the Sigmoid too
    s = b.binary("add", b.bn(b.conv(t, C, C, 3), C), t)
    out = b.binary("mul", s, b.unary("opaque", t, "Sigmoid"))
    graph = b.graph(("in",), (out,))
    folded, _ = fold_graph(graph)
    # conv1+bn -> one conv (t stays a tensor); conv3+bn+t -> one conv on t (identity folded in)
    assert kinds(folded) == {"Relu": 1, "Conv": 2, "Sigmoid": 1, "Mul": 1}, kinds(folded)
    check_same(graph, folded, np.float64)


def test_a_graph_output_inside_a_chain_is_kept() -> None:
    b = Builder(5)
    x = b.unary("opaque", "in", "Relu")
    middle = b.bn(b.conv(x, C, C, 3), C)
    out = b.bn(b.conv(middle, C, C, 1), C)
    graph = b.graph(("in",), (middle, out))
    folded, _ = fold_graph(graph)
    assert kinds(folded) == {"Relu": 1, "Conv": 2}, kinds(folded)
    check_same(graph, folded, np.float64)


def test_zero_padding_after_a_batchnorm_splits_with_the_border_reason() -> None:
    b = Builder(6)
    x = b.unary("opaque", "in", "Relu")
    out = b.bn(b.conv(b.bn(b.conv(x, C, C, 1), C), C, C, 3, pad=1), C)
    graph = b.graph(("in",), (out,))
    folded, report = fold_graph(graph)
    assert kinds(folded) == {"Relu": 1, "Conv": 2}, kinds(folded)
    check_same(graph, folded, np.float64)
    (padded,) = [
        op.name for op in graph.ops if op.kind == "conv" and op.attrs["pads"] != ((0, 0),) * 2
    ]
    (refusal,) = report.refused
    assert refusal.at == padded and "border would differ" in refusal.reason, report


def test_a_depthwise_separable_pair_stays_two_convs_unless_asked() -> None:
    b = Builder(7)
    x = b.unary("opaque", "in", "Relu")
    out = b.bn(b.conv(b.bn(b.conv(x, C, C, 3, groups=C), C), C, 2 * C, 1), 2 * C)
    graph = b.graph(("in",), (out,))
    folded, report = fold_graph(graph)
    assert kinds(folded) == {"Relu": 1, "Conv": 2}, kinds(folded)
    assert any(r.reason.startswith("left apart for cost") for r in report.refused), report
    check_same(graph, folded, np.float64)
    merged, _ = fold_graph(graph, max_cost_ratio=float("inf"))
    assert kinds(merged) == {"Relu": 1, "Conv": 1}, kinds(merged)
    check_same(graph, merged, np.float64)


def test_a_relu_inside_a_branch_is_reported_and_the_rest_folds() -> None:
    b = Builder(8)
    x = b.unary("opaque", "in", "Relu")
    inner = b.unary("opaque", b.bn(b.conv(x, C, C, 1), C), "Relu")
    out = b.binary("add", b.bn(b.conv(inner, C, C, 3), C), b.bn(b.conv(x, C, C, 1), C))
    graph = b.graph(("in",), (out,))
    folded, report = fold_graph(graph)
    assert kinds(folded) == {"Relu": 2, "Conv": 3, "Add": 1}, kinds(folded)
    check_same(graph, folded, np.float64)
    assert any(
        "inside the branch between" in r.reason and "Relu" in r.reason for r in report.refused
    )


def test_a_region_without_a_conv_stays_as_it_is() -> None:
    b = Builder(9)
    x = b.unary("opaque", "in", "Relu")
    out = b.by_constant("mul", b.bn(x, C), np.asarray(0.5))
    graph = b.graph(("in",), (out,))
    folded, report = fold_graph(graph)
    assert folded.ops == graph.ops and not report.folded


def test_dilated_branches_and_pools_fold() -> None:
    b = Builder(10)
    x = b.unary("opaque", "in", "Relu")
    big = b.bn(b.conv(x, C, C, 5, groups=C), C)
    dil = b.bn(b.conv(x, C, C, 3, groups=C, dilation=2), C)
    pool = b.bn(b.unary("avg_pool", x, "AveragePool", size=(3, 3), stride=(1, 1),
                        pads=((1, 1), (1, 1)), count_include_pad=True), C)  # fmt: skip
    out = b.binary("add", b.binary("add", big, dil), pool)
    graph = b.graph(("in",), (out,))
    folded, _ = fold_graph(graph)
    assert kinds(folded) == {"Relu": 1, "Conv": 1}, kinds(folded)
    check_same(graph, folded, np.float64)


@pytest.mark.parametrize("shapes", [True, False], ids=["shapes known", "shapes unknown"])
def test_a_classifier_head_folds_through_its_linear_layer(shapes: bool) -> None:
    # BN_Linear then Linear_BN (LeViT, RepViT heads): BN1d -> Linear -> BN1d -> Linear, no
    # nonlinearity between: one linear layer (8 -> 3 costs less than 8 -> 6 -> 3)
    b = Builder(11)
    x = b.unary("opaque", "in", "Relu")
    pooled = b.unary("opaque", b.unary("avg_pool", x, "AveragePool", size=(9, 10),
                                       stride=(9, 10), pads=((0, 0), (0, 0)),
                                       count_include_pad=True), "Flatten")  # fmt: skip
    head = b.linear(b.bn(pooled, C), C, 6)
    out = b.linear(b.bn(head, 6), 6, 3)
    graph = b.graph(("in",), (out,))
    if shapes:
        known = {pooled: (2, C), head: (2, 6), out: (2, 3)}
        graph = Graph(graph.ops, graph.inputs, graph.outputs, graph.constants, known)
    folded, report = fold_graph(graph)
    assert kinds(folded) == {"Relu": 1, "AveragePool": 1, "Flatten": 1, "Gemm": 1}, report
    (gemm,) = [op for op in folded.ops if op.label == "Gemm"]
    assert gemm.kind == "linear" and folded.constants[gemm.inputs[1]].shape == (3, C)
    check_same(graph, folded, np.float64)


def test_malformed_graphs_are_refused_in_one_line() -> None:
    conv = Op("c", "conv", ("x", "w"), ("y",), {"stride": (1, 1), "pads": ((0, 0), (0, 0)),
                                                  "groups": 1, "dilation": (1, 1)})  # fmt: skip
    missing = Graph((conv,), ("in",), ("y",), {"w": np.ones((1, 1, 1, 1))})
    with pytest.raises(ReparamError, match="reads tensor 'x', which no op produces"):
        fold_graph(missing)
    a = Op("a", "opaque", ("in", "z"), ("y2",))
    b = Op("b", "opaque", ("y2",), ("z",))
    with pytest.raises(ReparamError, match="cycle"):
        fold_graph(Graph((a, b), ("in",), ("z",), {}))
    with pytest.raises(ReparamError, match="max_cost_ratio"):
        fold_graph(Graph((), ("in",), ("in",), {}), max_cost_ratio=0)
