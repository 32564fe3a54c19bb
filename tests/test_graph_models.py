"""Whole models folded from their ONNX graphs: PyTorch's exports of train forms, in and out.

Every model of ``graph_models`` (each registered family's block alone, and two of each inside
small networks of a few families; a RepVGG network; blocks users write) is exported with both
PyTorch exporters (TorchScript, opset 17; ``torch.export``, opset 18 with external data) at
batch 1 and folded with :func:`reparam.graph.fold_onnx`; a combination an exporter cannot
export is skipped with its reason (PP-YOLOE under ``torch.export``). Then, per model and
exporter:

* onnxruntime runs the train graph and the folded graph on the same seeded batch of 2 (the
  batch axis is symbolic): they agree within the float32 tolerance of ``tolerances.py``
  relative to the largest value any tensor of the train graph takes (what rounding errors of
  the folded sums are proportional to);
* ``onnx.checker.check_model(folded, full_check=True)`` passes and the batch stays symbolic;
* the node count does not grow;
* the folded graph has as many ``Conv`` nodes as the published deploy form has convolutions
  (counted by hand below, never by the code under test) and no ``BatchNormalization`` (no
  deploy form here keeps one).

The report is checked where the fold must leave something apart: a ReLU inside a branch, a
zero-padded 3x3 conv after a 1x1 conv + BN (the border), a depthwise-pointwise pair (cost).
``test_models_miss_no_branch`` checks the models themselves: zeroing any one layer (conv,
BatchNorm, linear) moves the output far beyond the tolerance, so a branch the fold dropped
would show; ``test_every_family_is_covered`` fails when a family is registered without a
configuration, a network and a hand count here.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from graph_models import (  # noqa: E402  (after the importorskips)
    FAMILY_CONFIGS,
    NETWORK_GROUPS,
    USER_BLOCKS,
    build_family_block,
    build_family_net,
    build_repvgg_net,
    build_user_block,
    export,
)
from tolerances import TOLERANCE, assert_close  # noqa: E402
from torch_families import FAMILY_CLASSES  # noqa: E402

from reparam.graph import fold_onnx  # noqa: E402

EXPORTERS = {"torchscript": False, "dynamo": True}
F32 = np.float32


class Case(NamedTuple):
    """A model, the number of convs of its published deploy form, exporters that cannot."""

    build: Callable[[], tuple[Any, tuple[int, ...]]]
    convs: int
    cannot_export: tuple[tuple[str, str], ...] = ()  # (exporter, why)


#: The combinations skipped, each with the exporter's reason.
_PPYOLOE = (
    (
        "dynamo",
        "torch.export cannot trace PP-YOLOE's `if self.alpha:` (a Python branch on a "
        "parameter's value: GuardOnDataDependentSymNode); the TorchScript export covers it",
    ),
)


# Deploy forms, counted by hand (never by the code under test):
# - a family's block: one k x k conv with bias (QARepVGG's and RepViT's post-sum BatchNorm
#   and Conv2's fold into it too), except RepGhost's module, whose primary conv + BN + ReLU
#   stays before the fused cheap operation (two convs), and RepViT's BN_Linear, one Gemm and
#   no conv;
_FAMILY_CONVS = {name: 1 for name in FAMILY_CLASSES} | {"RepGhostModule": 2, "BN_Linear": 0}
# - FamilyNet: the stem's conv (BN folded) 1, two blocks of each image family, the SE's two
#   1x1 convs 2 and the residual's two conv+BN 2 (its Add reads two computed tensors and
#   stays); BN_Linear blocks are the head:
#     round-one: 1 + 2 * 7 + 2 + 2 = 19   (seven families, one conv each)
#     yolo:      1 + 2 * 5 + 2 + 2 = 15   (five families, one conv each)
#     ppyoloe:   1 + 2 * 1 + 2 + 2 = 7
#     vit:       1 + 2 * 4 + 2 + 2 = 13   (RepVGGDW, Conv2d_BN, RepMixer, RepCPE; BN_Linear head)
#     misc:      1 + 2 * 2 + 2 * 1 + 2 + 2 = 11   (RepGhost two convs each, Dilated one)
_NETWORK_CONVS = {"round-one": 19, "yolo": 15, "ppyoloe": 7, "vit": 13, "misc": 11}
# - RepVGGNet with A0's depths: one conv per block, 1 + 2 + 4 + 14 + 1 = 22;
# - user blocks: see each class's docstring; relu_inside keeps conv1+bn1, conv3+bn2 and conv1b
#   (3 convs and the Add), sequential_border two convs (border), depthwise_pointwise two
#   (cost).
_USER_CONVS = {
    "repvgg_5x5": 1,
    "scaled_branch": 1,
    "negated_branch": 1,
    "repmixer": 1,
    "post_sum_bn": 1,
    "avgpool_branch": 1,
    "relu_inside": 3,
    "sequential_border": 2,
    "depthwise_pointwise": 2,
}
# The whole deploy graph of a single block where it is not one Conv:
_DEPLOY_OPS = {
    "block-RepGhostModule": ("Conv", "Relu", "Conv"),  # primary conv+BN, ReLU, fused cheap op
    "block-BN_Linear": ("Gemm",),  # BN1d folded into the linear layer
    "user-relu_inside": ("Conv", "Relu", "Conv", "Conv", "Add"),
    "user-sequential_border": ("Conv", "Conv"),
    "user-depthwise_pointwise": ("Conv", "Conv"),
}
CASES: dict[str, Case] = {}
for _family in FAMILY_CONFIGS:
    CASES[f"block-{_family}"] = Case(
        functools.partial(build_family_block, _family),
        _FAMILY_CONVS[_family],
        _PPYOLOE if _family == "ppdet.RepVggBlock" else (),
    )
for _group in NETWORK_GROUPS:
    CASES[f"net-{_group}"] = Case(
        functools.partial(build_family_net, _group),
        _NETWORK_CONVS[_group],
        _PPYOLOE if _group == "ppyoloe" else (),
    )
CASES["repvgg-net"] = Case(build_repvgg_net, 22)
for _name in USER_BLOCKS:
    CASES[f"user-{_name}"] = Case(functools.partial(build_user_block, _name), _USER_CONVS[_name])


def test_every_family_is_covered() -> None:
    """Every registered family has a configuration, a network, and a hand count here."""
    families = set(FAMILY_CLASSES)
    assert set(FAMILY_CONFIGS) == families, (
        f"families without a configuration: {sorted(families - set(FAMILY_CONFIGS))}"
    )
    grouped = [name for group in NETWORK_GROUPS.values() for name in group]
    assert sorted(grouped) == sorted(families), (
        f"each family must sit in exactly one network; missing "
        f"{sorted(families - set(grouped))}, repeated "
        f"{sorted({n for n in grouped if grouped.count(n) > 1})}"
    )
    assert set(_NETWORK_CONVS) == set(NETWORK_GROUPS), "a network without its hand count"
    assert set(_USER_CONVS) == set(USER_BLOCKS), "a user block without its hand count"


class Folded(NamedTuple):
    train_path: Path
    train: Any  # onnx.ModelProto, external data loaded
    folded: Any
    report: Any
    x: np.ndarray


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread() -> Any:
    """PyTorch on one thread here: these models are tiny, and its OpenMP workers spin."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def folded_model(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str, str], Folded]:
    """Export a case with an exporter (once per module), fold it; the seeded batch of 2."""
    cache: dict[tuple[str, str], Folded] = {}

    def get(case: str, exporter: str) -> Folded:
        if (case, exporter) not in cache:
            module, shape = CASES[case].build()
            directory = tmp_path_factory.mktemp(f"{case}-{exporter}")
            example = torch.randn((1, *shape), generator=torch.Generator().manual_seed(1))
            path = export(module, example, directory / "train.onnx", dynamo=EXPORTERS[exporter])
            folded, report = fold_onnx(path)
            x = np.random.default_rng(2).standard_normal((2, *shape)).astype(F32)
            cache[(case, exporter)] = Folded(path, onnx.load(path), folded, report, x)
        return cache[(case, exporter)]

    return get


def _session(model: Any) -> Any:
    options = ort.SessionOptions()
    # the graphs as written, not onnxruntime's own rewrites of them (it fuses Conv+BN too)
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.intra_op_num_threads = 1
    source = model if isinstance(model, str) else model.SerializeToString()
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def _run(model: Any, x: np.ndarray) -> np.ndarray:
    return _session(model).run(["output"], {"input": x})[0]


def _largest_tensor(model: Any, x: np.ndarray) -> float:
    """The largest |value| of any floating tensor the graph computes on ``x``, input included.

    Rounding errors of a folded sum are proportional to its terms, which are bounded by the
    values the train graph's own tensors take (a branch that cancels another is large before
    the sum), not to the output, which can be small after such a cancellation.
    """
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    known = {o.name for o in probe.graph.output}
    for node in probe.graph.node:
        for name in node.output:
            if name and name not in known:
                probe.graph.output.append(onnx.ValueInfoProto(name=name))
                known.add(name)
    values = _session(probe).run(None, {"input": x})
    floating = [np.abs(v).max() for v in values if np.issubdtype(np.asarray(v).dtype, np.floating)]
    return float(max([np.abs(x).max(), *floating]))


def _ops(model: Any, op_type: str) -> list[Any]:
    return [node for node in model.graph.node if node.op_type == op_type]


def _batch_axis(model: Any) -> str:
    return model.graph.input[0].type.tensor_type.shape.dim[0].dim_param


def _combinations() -> list[Any]:
    params = []
    for case, spec in CASES.items():
        for exporter in EXPORTERS:
            why = dict(spec.cannot_export).get(exporter)
            marks = [pytest.mark.skip(reason=why)] if why else []
            params.append(pytest.param(case, exporter, id=f"{case}-{exporter}", marks=marks))
    return params


@pytest.mark.parametrize(("case", "exporter"), _combinations())
def test_fold_matches_train_graph(
    case: str, exporter: str, folded_model: Callable[[str, str], Folded]
) -> None:
    result = folded_model(case, exporter)
    train, folded, x = result.train, result.folded, result.x
    where = f"{case}, {exporter} export"
    assert _batch_axis(train) == "batch", f"{where}: the export has no symbolic batch axis"
    assert _batch_axis(folded) == "batch", f"{where}: the fold lost the symbolic batch axis"
    onnx.checker.check_model(folded, full_check=True)

    expected = _run(str(result.train_path), x)
    actual = _run(folded, x)
    scale = _largest_tensor(train, x)
    assert_close(actual, expected, dtype=F32, scale=scale, what=f"{where}: folded vs train graph")

    before, after = len(train.graph.node), len(folded.graph.node)
    assert after <= before, f"{where}: the fold grew the graph from {before} to {after} nodes"
    convs = len(_ops(folded, "Conv"))
    assert convs == CASES[case].convs, (
        f"{where}: {convs} Conv nodes after folding, expected {CASES[case].convs} as in the "
        f"deploy form; report:\n{result.report}"
    )
    norms = [node.name for node in _ops(folded, "BatchNormalization")]
    assert not norms, f"{where}: BatchNormalization left after folding: {norms}\n{result.report}"
    if case.startswith(("block-", "user-")):  # the whole deploy graph, counted by hand
        kinds = sorted(node.op_type for node in folded.graph.node)
        expected_kinds = sorted(_DEPLOY_OPS.get(case, ("Conv",)))
        assert kinds == expected_kinds, (
            f"{where}: the deploy form's ops are {expected_kinds}; got {kinds}\n{result.report}"
        )


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_relu_inside_a_branch_is_reported(
    exporter: str, folded_model: Callable[[str, str], Folded]
) -> None:
    result = folded_model("user-relu_inside", exporter)
    (relu,) = _ops(result.train, "Relu")
    at_relu = [r for r in result.report.refused if r.at == relu.name]
    assert at_relu, f"{exporter}: no refusal names the ReLU {relu.name!r}:\n{result.report}"
    assert "nonlinearity before the sum" in at_relu[0].reason, (
        f"{exporter}: the refusal at the ReLU gives another reason: {at_relu[0].reason!r}"
    )
    assert relu.name in [node.name for node in result.folded.graph.node], (
        f"{exporter}: the ReLU {relu.name!r} is gone from the folded graph"
    )
    assert len(_ops(result.folded, "Add")) == 1, (
        f"{exporter}: the sum of the ReLU branch and conv1b must stay one Add\n{result.report}"
    )


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_zero_padding_after_a_biased_conv_is_reported(
    exporter: str, folded_model: Callable[[str, str], Folded]
) -> None:
    result = folded_model("user-sequential_border", exporter)
    (conv3,) = [node for node in _ops(result.train, "Conv") if any(_pads(node))]
    at_conv3 = [r for r in result.report.refused if r.at == conv3.name]
    assert at_conv3, (
        f"{exporter}: no refusal names the padded conv {conv3.name!r}:\n{result.report}"
    )
    assert "border would differ" in at_conv3[0].reason, (
        f"{exporter}: the refusal at {conv3.name!r} is not about the border: {at_conv3[0].reason!r}"
    )


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_costlier_composition_is_reported(
    exporter: str, folded_model: Callable[[str, str], Folded]
) -> None:
    result = folded_model("user-depthwise_pointwise", exporter)
    depthwise = [n.name for n in _ops(result.train, "Conv") if _group(n) > 1]
    assert len(depthwise) == 1, f"{exporter}: expected one depthwise Conv; got {depthwise}"
    later = [n.name for n in result.train.graph.node if n.name not in depthwise]
    cost = [r for r in result.report.refused if r.reason.startswith("left apart for cost")]
    assert cost, f"{exporter}: no refusal for cost:\n{result.report}"
    assert cost[0].at in later, (
        f"{exporter}: the cost refusal names {cost[0].at!r}, expected the pointwise part {later}"
    )


def _group(node: Any) -> int:
    return next((int(a.i) for a in node.attribute if a.name == "group"), 1)


def _pads(node: Any) -> list[int]:
    return next((list(a.ints) for a in node.attribute if a.name == "pads"), [0, 0, 0, 0])


@pytest.mark.parametrize("case", CASES)
def test_models_miss_no_branch(case: str) -> None:
    """Zeroing any one layer (conv, BatchNorm, linear) moves the output far beyond the tolerance."""
    module, shape = CASES[case].build()
    x = torch.randn((2, *shape), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        reference = module(x)
        threshold = 100 * TOLERANCE[np.dtype(F32)] * float(reference.abs().max())
        layers = [
            (name, m)
            for name, m in module.named_modules()
            if isinstance(getattr(m, "weight", None), torch.nn.Parameter)
        ]
        assert layers, f"{case}: no layer to check"
        for name, layer in layers:
            saved = [p.detach().clone() for p in (layer.weight, layer.bias) if p is not None]
            for p in (layer.weight, layer.bias):
                if p is not None:
                    p.zero_()
            change = float((module(x) - reference).abs().max())
            for p, value in zip(
                [p for p in (layer.weight, layer.bias) if p is not None], saved, strict=True
            ):
                p.copy_(value)
            assert change > threshold, (
                f"{case}: zeroing {name} changes the output by only {change:.3g} (threshold "
                f"{threshold:.3g}); a fold that dropped it might pass"
            )
