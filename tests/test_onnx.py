"""ONNX export: the graph built from NumPy weights runs in onnxruntime and matches reparam."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from tolerances import assert_close

import reparam
from reparam import ReparamError, RepVGG
from reparam.export.onnx import export_onnx, to_onnx


def _run(proto: object, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(
        proto.SerializeToString(),  # type: ignore[attr-defined]
        providers=["CPUExecutionProvider"],
    )
    (logits,) = session.run(None, {"input": x})
    return np.asarray(logits)


@pytest.fixture(scope="module")
def a0() -> RepVGG:
    return RepVGG.create("A0", num_classes=10, seed=3)


def test_a0_onnxruntime_matches_numpy_for_several_shapes(a0: RepVGG) -> None:
    proto = to_onnx(a0)
    rng = np.random.default_rng(0)
    # one graph, dynamic batch and spatial size: square, non-square, odd, batch 1 and 3
    for shape in [(1, 3, 32, 32), (3, 3, 40, 24), (2, 3, 33, 17)]:
        x = rng.standard_normal(shape).astype(np.float32)
        expected = a0.reparameterize()(x)
        assert_close(_run(proto, x), expected, dtype=np.float32, what=f"A0 ONNX {shape}")


def test_grouped_published_configuration(tmp_path: Path) -> None:
    model = RepVGG.create("B1g4", num_classes=10, seed=5)
    path = tmp_path / "b1g4.onnx"
    export_onnx(model, path)
    proto = onnx.load(str(path))
    groups = sorted(
        {attr.i for node in proto.graph.node for attr in node.attribute if attr.name == "group"}
    )
    assert groups == [1, 4], f"B1g4 must mix group 1 and group 4 convs; got {groups}"
    x = np.random.default_rng(1).standard_normal((2, 3, 32, 32)).astype(np.float32)
    assert_close(_run(proto, x), model.reparameterize()(x), dtype=np.float32, what="B1g4 ONNX")


def test_graph_structure_and_names(a0: RepVGG) -> None:
    proto = to_onnx(a0, opset=13)
    ops = [node.op_type for node in proto.graph.node]
    blocks = len(a0.blocks)
    assert ops == ["Conv", "Relu"] * blocks + ["GlobalAveragePool", "Flatten", "Gemm"], ops[:6]
    names = {init.name for init in proto.graph.initializer}
    assert "stage0.rbr_reparam.weight" in names, "initializers use the deploy key names"
    assert "linear.weight" in names, "the head keeps its checkpoint name"
    assert proto.opset_import[0].version == 13, "the requested opset is written"
    dims = [d.dim_param or d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", 3, "height", "width"], f"dynamic input dims: {dims}"


def test_timm_layout_names(a0: RepVGG) -> None:
    timm_model = RepVGG(a0.blocks, a0.head, arch=a0.arch, layout="timm")
    names = {init.name for init in to_onnx(timm_model).graph.initializer}
    assert {"stem.reparam_conv.weight", "stages.0.0.reparam_conv.bias", "head.fc.weight"} <= names


def test_float64_model_exports_float32_by_default() -> None:
    model = RepVGG.create("A0", num_classes=5, seed=2, dtype=np.float64)
    proto = to_onnx(model)
    assert proto.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    x = np.random.default_rng(2).standard_normal((1, 3, 32, 32))
    expected = model.reparameterize()(x)
    assert_close(_run(proto, x.astype(np.float32)), expected, dtype=np.float32, what="f64->f32")
    double = to_onnx(model, dtype=np.float64)
    assert double.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.DOUBLE


def test_bad_opset_and_suffix(a0: RepVGG, tmp_path: Path) -> None:
    with pytest.raises(ReparamError, match=r"to_onnx: opset out of range; got 7"):
        to_onnx(a0, opset=7)
    with pytest.raises(ReparamError, match=r"export_onnx: path must end in .onnx"):
        export_onnx(a0, tmp_path / "model.onx")
    assert list(tmp_path.iterdir()) == [], "a refused export writes nothing"


def test_failed_write_leaves_no_file(a0: RepVGG, tmp_path: Path) -> None:
    missing_dir = tmp_path / "missing" / "model.onnx"
    with pytest.raises(OSError):
        export_onnx(a0, missing_dir)
    assert not missing_dir.parent.exists(), "nothing created on a failed write"


def test_not_a_model() -> None:
    with pytest.raises(ReparamError, match=r"to_onnx: model must be a reparam.RepVGG"):
        to_onnx(reparam.BatchNorm([1.0], [0.0], [0.0], [1.0]))  # type: ignore[arg-type]


def test_cli_export_of_the_digits_model_classifies_like_numpy(tmp_path: Path) -> None:
    data = Path(reparam.__file__).parent / "data"
    target = tmp_path / "digits.onnx"
    result = subprocess.run(
        [sys.executable, "-m", "reparam", "export", str(data / "digits_repvgg.npz"), str(target)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, f"export failed: {result.stderr}"
    assert "converted from the train form" in result.stdout, result.stdout
    with np.load(data / "digits_test.npz") as test_set:
        images, labels = test_set["images"], test_set["labels"]
    logits = _run(onnx.load(str(target)), images)
    numpy_logits = reparam.load(data / "digits_repvgg.npz")(images)
    assert_close(logits, numpy_logits, dtype=np.float32, what="digits ONNX vs NumPy train form")
    agree = float(np.mean(logits.argmax(1) == numpy_logits.argmax(1)))
    accuracy = float(np.mean(logits.argmax(1) == labels))
    assert agree == 1.0, f"top-1 agreement {agree:.4f}"
    assert accuracy > 0.97, f"ONNX digits accuracy {accuracy:.4f}"


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--opset", "5"], "opset out of range; got 5"),
        ([], "expected one of .onnx"),
    ],
)
def test_cli_export_errors_exit_2_and_write_nothing(
    tmp_path: Path, arguments: list[str], message: str
) -> None:
    data = Path(reparam.__file__).parent / "data"
    name = "model.onnx" if arguments else "model.onx"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "reparam",
            "export",
            str(data / "digits_repvgg.npz"),
            str(tmp_path / name),
            *arguments,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2, f"expected exit 2; got {result.returncode}: {result.stderr}"
    assert message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr, "errors are one line, no traceback"
    assert list(tmp_path.iterdir()) == [], "a failed export writes nothing"
