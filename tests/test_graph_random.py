"""Random ONNX graphs, folded: every output the same in onnxruntime, never more nodes.

The graphs are built with ``onnx.helper`` alone (no PyTorch), valid by construction: the
strategy tracks every tensor's shape (N, C, H, W) and draws each op's configuration from
what fits it (groups among the divisors of the channels, then channels per group, then a
kernel, a dilation, and paddings for which the window fits; parallel branches get "same"
paddings so their outputs can be added). Ops: the affine ones the fold reads (``Conv`` with
random kernel, stride, pads, groups, dilation and bias; ``BatchNormalization``; ``Add``/``Sub``
of two tensors of one shape; ``Add``/``Sub``/``Mul``/``Div`` by a per-channel or scalar
constant, in either operand order where that is still affine; ``Neg``; constant ``Pad``,
zero and sometimes not, cropping sometimes; ``AveragePool`` with or without the padding
counted; ``Identity``) interleaved with nonlinear ones (``Relu``, ``Sigmoid``, ``Mul`` of two
computed tensors). Operands are drawn among all earlier tensors, so tensors are shared across
regions, and some intermediate tensors are graph outputs besides the leaves.

Laws checked for every graph: the folded graph passes ``check_model(full_check=True)``, has
the same outputs, no more nodes and no more ``Conv`` nodes (a region becomes one conv only if
it holds one), folding it again changes nothing (regions are maximal), and onnxruntime gives
the same values for every output within the float32 tolerance of ``tolerances.py``. A second
strategy, ``parallel_blocks``, builds the case the fold exists for (centred parallel branches
of one input sharing groups and stride, with BatchNorms, scales, negations, an identity and
an average pool, summed or subtracted): it must become exactly one ``Conv``.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402
from tolerances import assert_close  # noqa: E402

from reparam.graph import fold_onnx  # noqa: E402

BATCH = 2
MAX_CHANNELS = 8
MAX_SIDE = 10
MAX_OPS = 12
OPSET = 17
F32 = np.float32


class Tensor(NamedTuple):
    """A computed tensor of the graph being built: its name and shape (batch aside)."""

    name: str
    channels: int
    height: int
    width: int

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (BATCH, self.channels, self.height, self.width)


class RandomGraph(NamedTuple):
    """A drawn graph, the shape the strategy tracked for each tensor, and an input batch."""

    model: Any  # onnx.ModelProto
    shapes: dict[str, tuple[int, int, int, int]]
    x: np.ndarray


class _Builder:
    """Accumulates nodes and initializers; draws values from a seeded NumPy generator."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list[Any] = []
        self.initializers: list[Any] = []
        self.tensors: list[Tensor] = []
        self.consumed: set[str] = set()

    def constant(self, array: np.ndarray, *, dtype: Any = F32) -> str:
        name = f"c{len(self.initializers)}"
        self.initializers.append(numpy_helper.from_array(np.asarray(array, dtype=dtype), name))
        return name

    def node(self, op_type: str, inputs: list[str], like: Tensor, **attrs: Any) -> Tensor:
        return self.node_shaped(op_type, inputs, like.channels, like.height, like.width, **attrs)

    def node_shaped(
        self, op_type: str, inputs: list[str], channels: int, height: int, width: int, **attrs: Any
    ) -> Tensor:
        out = Tensor(f"t{len(self.tensors)}", channels, height, width)
        name = f"n{len(self.nodes)}_{op_type.lower()}"
        self.nodes.append(helper.make_node(op_type, inputs, [out.name], name=name, **attrs))
        self.consumed.update(i for i in inputs if i.startswith(("x", "t")))
        self.tensors.append(out)
        return out


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _split(draw: st.DrawFn, total: int) -> tuple[int, int]:
    """Split a padding total between the two sides, each at most 2."""
    first = draw(st.integers(max(0, total - 2), min(2, total)))
    return first, total - first


def _window(draw: st.DrawFn, side: int, *, same: bool) -> tuple[int, int, int, int, int]:
    """(kernel, dilation, stride, pad_begin, pad_end) of one axis of a conv on ``side`` pixels.

    ``same``: the padding is the effective kernel minus one, so the output size depends on
    the stride only ((side - 1) // stride + 1) and branches can be added. Otherwise the
    padding is drawn so that the window fits (side + pads >= effective kernel) and the output
    has at most MAX_SIDE pixels.
    """
    kernel = draw(st.integers(1, 3))
    dilation = draw(st.integers(1, 2)) if kernel > 1 else 1
    stride = draw(st.integers(1, 2))
    effective = dilation * (kernel - 1) + 1
    if same:
        total = effective - 1
    else:
        low = max(0, effective - side)
        high = min(4, MAX_SIDE - 1 - side + effective)
        total = draw(st.integers(low, high))
    begin, end = _split(draw, total)
    return kernel, dilation, stride, begin, end


def _conv(
    draw: st.DrawFn,
    b: _Builder,
    source: Tensor,
    *,
    out_channels: int | None = None,
    same: bool = False,
    stride: tuple[int, int] | None = None,
) -> Tensor:
    if out_channels is None:
        groups = draw(st.sampled_from(_divisors(source.channels)))
        out_channels = groups * draw(st.integers(1, MAX_CHANNELS // groups))
    else:
        groups = draw(st.sampled_from(_divisors(math.gcd(source.channels, out_channels))))
    kh, dh, sh, top, bottom = _window(draw, source.height, same=same)
    kw, dw, sw, left, right = _window(draw, source.width, same=same)
    if stride is not None:
        sh, sw = stride
    height = (source.height + top + bottom - dh * (kh - 1) - 1) // sh + 1
    width = (source.width + left + right - dw * (kw - 1) - 1) // sw + 1
    fan_in = source.channels // groups * kh * kw
    weight = b.rng.standard_normal((out_channels, source.channels // groups, kh, kw))
    inputs = [source.name, b.constant(weight / math.sqrt(fan_in))]
    if draw(st.booleans()):
        inputs.append(b.constant(0.5 * b.rng.standard_normal(out_channels)))
    attrs: dict[str, Any] = dict(
        strides=[sh, sw], pads=[top, left, bottom, right], dilations=[dh, dw], group=groups
    )
    if draw(st.booleans()):
        attrs["kernel_shape"] = [kh, kw]
    return b.node_shaped("Conv", inputs, out_channels, height, width, **attrs)


def _batch_norm(draw: st.DrawFn, b: _Builder, source: Tensor) -> Tensor:
    c = source.channels
    params = [
        b.rng.uniform(0.5, 1.5, c),  # scale (gamma)
        0.5 * b.rng.standard_normal(c),  # bias (beta)
        0.5 * b.rng.standard_normal(c),  # running mean
        b.rng.uniform(0.5, 2.0, c),  # running variance
    ]
    eps = draw(st.sampled_from([1e-5, 1e-3]))
    inputs = [source.name, *(b.constant(p) for p in params)]
    return b.node("BatchNormalization", inputs, source, epsilon=eps)


def _per_channel(draw: st.DrawFn, b: _Builder, channels: int, values: np.ndarray) -> str:
    """A constant broadcast over an NCHW tensor: per channel (C,1,1) / (1,C,1,1), or scalar."""
    form = draw(st.sampled_from(["C11", "1C11", "scalar", "1"]))
    if form == "C11":
        return b.constant(values.reshape(channels, 1, 1))
    if form == "1C11":
        return b.constant(values.reshape(1, channels, 1, 1))
    if form == "scalar":
        return b.constant(np.asarray(values[0]))
    return b.constant(values[:1])


def _constant_op(draw: st.DrawFn, b: _Builder, source: Tensor) -> Tensor:
    op_type = draw(st.sampled_from(["Add", "Sub", "Mul", "Div"]))
    c = source.channels
    if op_type in ("Add", "Sub"):
        values = b.rng.standard_normal(c)
    else:  # away from zero, either sign
        values = b.rng.uniform(0.5, 2.0, c) * b.rng.choice([-1.0, 1.0], c)
    constant = _per_channel(draw, b, c, values)
    constant_first = op_type != "Div" and draw(st.booleans())  # c / x is not affine
    inputs = [constant, source.name] if constant_first else [source.name, constant]
    return b.node(op_type, inputs, source)


def _pad(draw: st.DrawFn, b: _Builder, source: Tensor) -> Tensor:
    """Constant-mode Pad of H and W: each side in [-1, 2] (negative crops), size kept in range."""
    sides = []
    for size in (source.height, source.width):
        begin = draw(st.integers(-1 if size > 2 else 0, min(2, MAX_SIDE + 1 - size)))
        low = max(-1, 1 - size - begin)  # keep at least one pixel
        high = min(2, MAX_SIDE - size - begin)
        end = draw(st.integers(low, high))
        sides.append((begin, end))
    (top, bottom), (left, right) = sides
    pads = b.constant(np.array([0, 0, top, left, 0, 0, bottom, right]), dtype=np.int64)
    value = draw(st.sampled_from([None, 0.0, 0.0, 0.5, -1.25]))
    inputs = [source.name, pads] + ([] if value is None else [b.constant(np.asarray(value))])
    height, width = source.height + top + bottom, source.width + left + right
    return b.node_shaped("Pad", inputs, source.channels, height, width, mode="constant")


def _avg_pool(draw: st.DrawFn, b: _Builder, source: Tensor) -> Tensor:
    """AveragePool with pads below the kernel (as onnxruntime requires), padding counted or not."""
    attrs: dict[str, Any] = {}
    kernel, stride, pads = [], [], [[], []]
    out = []
    for size in (source.height, source.width):
        k = draw(st.integers(1, min(3, size + 2)))
        s = draw(st.integers(1, 2))
        total = draw(st.integers(max(0, k - size), min(2 * (k - 1), MAX_SIDE - 1 - size + k)))
        begin = draw(st.integers(max(0, total - (k - 1)), min(k - 1, total)))
        kernel.append(k)
        stride.append(s)
        pads[0].append(begin)
        pads[1].append(total - begin)
        out.append((size + total - k) // s + 1)
    attrs = dict(
        kernel_shape=kernel,
        strides=stride,
        pads=pads[0] + pads[1],
        count_include_pad=draw(st.integers(0, 1)),
    )
    return b.node_shaped("AveragePool", [source.name], source.channels, *out, **attrs)


def _same_shape(draw: st.DrawFn, b: _Builder, source: Tensor) -> Tensor:
    """A computed tensor of ``source``'s shape (``source`` itself if no other has it)."""
    return draw(st.sampled_from([t for t in b.tensors if t[1:] == source[1:]]))


def _branches(draw: st.DrawFn, b: _Builder, source: Tensor) -> Tensor:
    """2-3 parallel convs of one source (each perhaps with a BatchNorm), summed or subtracted;
    plus the source itself (perhaps through a BatchNorm) when the shapes allow: RepVGG-like.
    """
    out_channels = draw(st.integers(1, MAX_CHANNELS))
    stride = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    terms = []
    for _ in range(draw(st.integers(2, 3))):
        branch = _conv(draw, b, source, out_channels=out_channels, same=True, stride=stride)
        terms.append(_batch_norm(draw, b, branch) if draw(st.booleans()) else branch)
    if out_channels == source.channels and stride == (1, 1) and draw(st.booleans()):
        terms.append(_batch_norm(draw, b, source) if draw(st.booleans()) else source)
    total = terms[0]
    for term in terms[1:]:
        op_type = draw(st.sampled_from(["Add", "Add", "Sub"]))
        total = b.node(op_type, [total.name, term.name], total)
    return total


_KINDS = (
    "conv",
    "conv",
    "branches",
    "branches",
    "batch_norm",
    "add",
    "sub",
    "constant",
    "constant",
    "neg",
    "pad",
    "avg_pool",
    "identity",
    "relu",
    "sigmoid",
    "mul",
)


@st.composite
def random_graphs(draw: st.DrawFn) -> RandomGraph:
    """A random valid ONNX model (opset 17, float32, static shapes) and a seeded input."""
    b = _Builder(draw(st.integers(0, 2**32 - 1)))
    shape = (
        draw(st.integers(1, 6)),
        draw(st.integers(3, MAX_SIDE)),
        draw(st.integers(3, MAX_SIDE)),
    )
    x = Tensor("x", *shape)
    b.tensors.append(x)
    for _ in range(draw(st.integers(1, MAX_OPS))):
        latest = draw(st.booleans())
        source = b.tensors[-1] if latest else draw(st.sampled_from(b.tensors))
        kind = draw(st.sampled_from(_KINDS))
        if kind == "conv":
            _conv(draw, b, source, same=draw(st.booleans()))
        elif kind == "branches":
            _branches(draw, b, source)
        elif kind == "batch_norm":
            _batch_norm(draw, b, source)
        elif kind in ("add", "sub", "mul"):
            other = _same_shape(draw, b, source)
            b.node(kind.capitalize(), [source.name, other.name], source)
        elif kind == "constant":
            _constant_op(draw, b, source)
        elif kind == "pad":
            _pad(draw, b, source)
        elif kind == "avg_pool":
            _avg_pool(draw, b, source)
        else:  # neg, identity, relu, sigmoid
            op_type = {"neg": "Neg", "identity": "Identity", "relu": "Relu", "sigmoid": "Sigmoid"}
            b.node(op_type[kind], [source.name], source)
    computed = b.tensors[1:]
    leaves = [t for t in computed if t.name not in b.consumed]
    middle = [t for t in computed if t.name in b.consumed and draw(st.integers(0, 4)) == 0]
    outputs = sorted(leaves + middle, key=lambda t: int(t.name[1:]))
    graph = helper.make_graph(
        b.nodes,
        "random",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
        [helper.make_tensor_value_info(t.name, TensorProto.FLOAT, list(t.shape)) for t in outputs],
        initializer=b.initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    data = b.rng.standard_normal(x.shape).astype(F32)
    return RandomGraph(model, {t.name: t.shape for t in b.tensors}, data)


@st.composite
def parallel_blocks(draw: st.DrawFn) -> RandomGraph:
    """One block of parallel branches of the input, summed: always exactly one conv.

    Every branch has the block's groups, stride and no dilation, and is centred (odd kernel,
    padding ``(k - 1) / 2`` on each side); the first branch's kernel is at least as large as
    every other's on each axis, so the fused conv costs no more than that branch alone. Each
    branch is a conv (bias or not) optionally followed by a BatchNorm, a per-channel or scalar
    ``Mul`` and a ``Neg``; with ``C_in == C_out`` and stride 1 the input itself (perhaps
    through a BatchNorm) and a centred ``AveragePool`` counting its zero padding may join.
    Branches are combined by ``Add`` or ``Sub``; a per-channel constant may be added last.
    """
    b = _Builder(draw(st.integers(0, 2**32 - 1)))
    groups = draw(st.integers(1, 4))
    c_in = groups * draw(st.integers(1, MAX_CHANNELS // groups))
    c_out = groups * draw(st.integers(1, MAX_CHANNELS // groups))
    stride = draw(st.integers(1, 2))
    x = Tensor("x", c_in, draw(st.integers(3, MAX_SIDE)), draw(st.integers(3, MAX_SIDE)))
    b.tensors.append(x)
    height, width = (x.height - 1) // stride + 1, (x.width - 1) // stride + 1
    largest = (draw(st.sampled_from([1, 3, 5])), draw(st.sampled_from([1, 3, 5])))
    terms: list[Tensor] = []
    for index in range(draw(st.integers(1, 3))):
        kernel = largest
        if index:
            kernel = tuple(draw(st.sampled_from([k for k in (1, 3, 5) if k <= m])) for m in largest)
        kh, kw = kernel
        weight = b.rng.standard_normal((c_out, c_in // groups, kh, kw)) / math.sqrt(kh * kw)
        inputs = [x.name, b.constant(weight)]
        if draw(st.booleans()):
            inputs.append(b.constant(0.5 * b.rng.standard_normal(c_out)))
        ph, pw = (kh - 1) // 2, (kw - 1) // 2
        term = b.node_shaped(
            "Conv",
            inputs,
            c_out,
            height,
            width,
            strides=[stride, stride],
            pads=[ph, pw, ph, pw],
            group=groups,
        )
        term = _affine_tail(draw, b, term)
        terms.append(term)
    if c_in == c_out and stride == 1:
        if draw(st.booleans()):
            terms.append(_batch_norm(draw, b, x) if draw(st.booleans()) else x)
        if draw(st.booleans()):
            k = draw(st.sampled_from([k for k in (1, 3, 5) if k <= min(largest)]))
            p = (k - 1) // 2
            pooled = b.node(
                "AveragePool",
                [x.name],
                x,
                kernel_shape=[k, k],
                pads=[p, p, p, p],
                count_include_pad=1,
            )
            terms.append(_affine_tail(draw, b, pooled))
    total = terms[0]
    for term in terms[1:]:
        total = b.node(draw(st.sampled_from(["Add", "Sub"])), [total.name, term.name], total)
    if draw(st.booleans()):
        values = b.rng.standard_normal(c_out)
        total = b.node("Add", [total.name, _per_channel(draw, b, c_out, values)], total)
    graph = helper.make_graph(
        b.nodes,
        "parallel",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
        [helper.make_tensor_value_info(total.name, TensorProto.FLOAT, list(total.shape))],
        initializer=b.initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    data = b.rng.standard_normal(x.shape).astype(F32)
    return RandomGraph(model, {t.name: t.shape for t in b.tensors}, data)


def _affine_tail(draw: st.DrawFn, b: _Builder, term: Tensor) -> Tensor:
    """Optionally a BatchNorm, a Mul by a per-channel or scalar constant, and a Neg."""
    if draw(st.booleans()):
        term = _batch_norm(draw, b, term)
    if draw(st.booleans()):
        values = b.rng.uniform(0.5, 2.0, term.channels) * b.rng.choice([-1.0, 1.0])
        term = b.node("Mul", [term.name, _per_channel(draw, b, term.channels, values)], term)
    if draw(st.booleans()):
        term = b.node("Neg", [term.name], term)
    return term


# ----------------------------------------------------------------------------- helpers


def _session(model: Any) -> Any:
    options = ort.SessionOptions()
    # the graph as written: onnxruntime's own fusions would blur what is compared
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.intra_op_num_threads = 1
    return ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )


def _outputs(model: Any, x: np.ndarray) -> dict[str, np.ndarray]:
    session = _session(model)
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, {"x": x}), strict=True))


def _every_tensor(model: Any, x: np.ndarray) -> dict[str, np.ndarray]:
    """Every tensor the graph computes on ``x`` (each node output made a graph output)."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    known = {o.name for o in probe.graph.output}
    for node in probe.graph.node:
        for name in node.output:
            if name not in known:
                probe.graph.output.append(onnx.ValueInfoProto(name=name))
                known.add(name)
    return _outputs(probe, x)


def _kinds(model: Any) -> list[str]:
    return [node.op_type for node in model.graph.node]


# ----------------------------------------------------------------------------- the strategy


@settings(deadline=None)
@given(random_graphs())
def test_random_graphs_are_valid(graph: RandomGraph) -> None:
    """The strategy's graphs pass the checker, and every shape it tracked is the real one."""
    onnx.checker.check_model(graph.model, full_check=True)
    tensors = _every_tensor(graph.model, graph.x)
    assert set(tensors) == set(graph.shapes) - {"x"}, "a tensor is missing or unexpected"
    for name, value in tensors.items():
        assert value.shape == graph.shapes[name], (
            f"{name}: onnxruntime computed shape {value.shape}, the strategy tracked "
            f"{graph.shapes[name]}"
        )
        assert np.all(np.isfinite(value)), f"{name}: non-finite values"
    consumed = {i for node in graph.model.graph.node for i in node.input}
    outputs = {o.name for o in graph.model.graph.output}
    assert all(n in consumed or n in outputs for n in tensors), "a tensor nobody reads"


@settings(deadline=None)
@given(parallel_blocks())
def test_parallel_blocks_are_valid(graph: RandomGraph) -> None:
    """The parallel-branch strategy's graphs pass the checker with the shapes it tracked."""
    onnx.checker.check_model(graph.model, full_check=True)
    tensors = _every_tensor(graph.model, graph.x)
    for name, value in tensors.items():
        assert value.shape == graph.shapes[name], (
            f"{name}: onnxruntime computed shape {value.shape}, the strategy tracked "
            f"{graph.shapes[name]}"
        )


# ----------------------------------------------------------------------------- the laws


@settings(deadline=None)
@given(random_graphs())
def test_fold_keeps_every_output(graph: RandomGraph) -> None:
    folded, report = fold_onnx(graph.model)
    onnx.checker.check_model(folded, full_check=True)
    names = [o.name for o in graph.model.graph.output]
    assert [o.name for o in folded.graph.output] == names, "graph outputs changed"
    before, after = _kinds(graph.model), _kinds(folded)
    assert len(after) <= len(before), f"nodes grew {len(before)} -> {len(after)}:\n{report}"
    assert after.count("Conv") <= before.count("Conv"), (
        f"Conv nodes grew {before.count('Conv')} -> {after.count('Conv')}:\n{report}"
    )

    # Rounding errors of a folded conv are proportional to the terms it sums, which are
    # bounded by the values the train graph's own tensors take: a branch cancelled by another
    # is large before the sum. So the magnitude is the largest |value| over every tensor of
    # the train graph, the input included, not over the outputs alone. (Running the graph on
    # |x| with |weights| would bound the terms too, but has no meaning for Sigmoid, Sub or a
    # Mul of two tensors, which these graphs hold.)
    every = _every_tensor(graph.model, graph.x)
    magnitude = max(float(np.abs(v).max()) for v in [graph.x, *every.values()])
    actual = _outputs(folded, graph.x)
    for name in names:
        assert_close(
            actual[name], every[name], dtype=F32, scale=magnitude, what=f"output {name}\n{report}"
        )


@settings(deadline=None)
@given(random_graphs())
def test_folding_twice_changes_nothing(graph: RandomGraph) -> None:
    """Regions are maximal: a folded graph has nothing left to fold."""
    once, report = fold_onnx(graph.model)
    twice, again = fold_onnx(once)
    assert _kinds(twice) == _kinds(once), (
        f"a second fold changed {_kinds(once)} into {_kinds(twice)}\nfirst:\n{report}\n"
        f"second:\n{again}"
    )


@settings(deadline=None)
@given(parallel_blocks())
def test_parallel_branches_fold_into_one_conv(graph: RandomGraph) -> None:
    """Branches of one input that share groups and stride, centred, summed: one Conv."""
    folded, report = fold_onnx(graph.model)
    assert _kinds(folded) == ["Conv"], (
        f"expected one Conv from {_kinds(graph.model)}; got {_kinds(folded)}\n{report}"
    )
    every = _every_tensor(graph.model, graph.x)
    magnitude = max(float(np.abs(v).max()) for v in [graph.x, *every.values()])
    (name,) = [o.name for o in graph.model.graph.output]
    actual = _outputs(folded, graph.x)[name]
    assert_close(actual, every[name], dtype=F32, scale=magnitude, what=f"{name}\n{report}")
