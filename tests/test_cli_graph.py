"""The command line on ONNX graphs: ``reparam convert/info/verify MODEL.onnx``, as a subprocess.

Each command reads the file into its kind (here a graph) and runs that kind's action; the
commands that take only a RepVGG checkpoint refuse a graph in one line. Every error exits 2
with one line on stderr and writes nothing.
"""

from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from tolerances import assert_close

from reparam.cli import VERIFY_TOLERANCE, main


def _cli(*args: str | Path, code: str | None = None) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "reparam"] if code is None else [sys.executable, "-c", code]
    return subprocess.run(
        [*command, *map(str, args)], capture_output=True, text=True, timeout=300, check=False
    )


def _ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result.stdout


def _error(result: subprocess.CompletedProcess[str], *fragments: str) -> str:
    """Exit 2, one error line holding every fragment, no traceback; returns that line."""
    assert result.returncode == 2, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if "error" in line]
    assert len(errors) == 1, f"expected one error line:\n{result.stderr}"
    for fragment in fragments:
        assert fragment in errors[0], f"{fragment!r} not in {errors[0]!r}"
    return errors[0]


def _run(model: Any, x: np.ndarray) -> np.ndarray:
    source = model if isinstance(model, str) else model.SerializeToString()
    session = ort.InferenceSession(source, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return np.asarray(session.run(None, {name: x})[0])


# --------------------------------------------------------------------------- models


class _Block(torch.nn.Module):
    """3x3 conv-BN + 1x1 conv-BN + identity BN, then ReLU; random statistics."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv3 = torch.nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn3 = torch.nn.BatchNorm2d(c)
        self.conv1 = torch.nn.Conv2d(c, c, 1, bias=False)
        self.bn1 = torch.nn.BatchNorm2d(c)
        self.bni = torch.nn.BatchNorm2d(c)
        for bn in (self.bn3, self.bn1, self.bni):
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
            bn.weight.data.uniform_(0.5, 1.5)
            bn.bias.data.uniform_(-1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.bn3(self.conv3(x)) + self.bn1(self.conv1(x)) + self.bni(x))


class _NearMiss(torch.nn.Module):
    """A ReLU inside a branch: the branch stays apart (a near miss ``info`` reports)."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv3 = torch.nn.Conv2d(c, c, 3, padding=1)
        self.conv1 = torch.nn.Conv2d(c, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv3(x) + torch.relu(self.conv1(x))


def _export(module: torch.nn.Module, path: Path, *, dynamo: bool, spatial: bool = False) -> Path:
    torch.manual_seed(0)
    module = module.eval()
    x = torch.randn(1, 4, 8, 8)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            dims = {0: torch.export.Dim("batch", min=1, max=64)}
            torch.onnx.export(
                module,
                (x,),
                str(path),
                dynamo=True,
                opset_version=18,
                input_names=["image"],
                output_names=["features"],
                dynamic_shapes=(dims,),
                verbose=False,
            )
        else:
            axes = {0: "batch", 2: "height", 3: "width"} if spatial else {0: "batch"}
            torch.onnx.export(
                module,
                (x,),
                str(path),
                dynamo=False,
                opset_version=17,
                input_names=["image"],
                output_names=["features"],
                dynamic_axes={"image": axes, "features": axes},
            )
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("graphs")
    torch.manual_seed(0)
    net = torch.nn.Sequential(_Block(4), _Block(4))
    return {
        "torchscript": _export(net, root / "train.onnx", dynamo=False),
        "dynamo": _export(net, root / "dynamo.onnx", dynamo=True),
        "spatial": _export(net, root / "spatial.onnx", dynamo=False, spatial=True),
        "near_miss": _export(_NearMiss(4), root / "near_miss.onnx", dynamo=False),
    }


def _helper_model(nodes: list[Any], initializers: list[Any], opset: int = 17) -> Any:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])
    graph = helper.make_graph(nodes, "g", [x], [y], initializer=initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _two_convs(opset: int = 17) -> Any:
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.standard_normal((4, 4, 3, 3)).astype(np.float32), "w3"),
        numpy_helper.from_array(rng.standard_normal((4, 4, 1, 1)).astype(np.float32), "w1"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w3"], ["a"], name="conv3", pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["x", "w1"], ["b"], name="conv1"),
        helper.make_node("Add", ["a", "b"], ["y"], name="sum"),
    ]
    return _helper_model(nodes, inits, opset)


# --------------------------------------------------------------------------- convert


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_convert(models: dict[str, Path], tmp_path: Path, exporter: str) -> None:
    deploy = tmp_path / "deploy.onnx"
    out = _ok(_cli("convert", models[exporter], deploy))
    assert "2 regions folded; ops 12 -> 4; parameters" in out, out
    assert f"wrote {deploy}" in out, out
    folded = onnx.load(str(deploy))
    onnx.checker.check_model(folded, full_check=True)
    assert [n.op_type for n in folded.graph.node] == ["Conv", "Relu", "Conv", "Relu"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["deploy.onnx"], "stray files"
    x = np.random.default_rng(1).standard_normal((3, 4, 8, 8)).astype(np.float32)
    expected = _run(str(models[exporter]), x)
    assert_close(_run(str(deploy), x), expected, dtype=np.float32, what=f"{exporter} convert")


def test_convert_keeps_names_and_dynamic_batch(models: dict[str, Path], tmp_path: Path) -> None:
    deploy = tmp_path / "deploy.onnx"
    _ok(_cli("convert", models["torchscript"], deploy))
    train, folded = onnx.load(str(models["torchscript"])), onnx.load(str(deploy))
    assert folded.graph.input == train.graph.input and folded.graph.output == train.graph.output
    assert folded.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert (folded.producer_name, folded.opset_import) == (train.producer_name, train.opset_import)


def test_convert_max_cost_ratio(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    inits = [
        numpy_helper.from_array(rng.standard_normal((4, 1, 3, 3)).astype(np.float32), "dw"),
        numpy_helper.from_array(rng.standard_normal((4, 4, 1, 1)).astype(np.float32), "pw"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "dw"], ["d"], name="dw", group=4, pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["d", "pw"], ["y"], name="pw"),
    ]
    source = tmp_path / "dwpw.onnx"
    source.write_bytes(_helper_model(nodes, inits).SerializeToString())
    kept, merged = tmp_path / "kept.onnx", tmp_path / "merged.onnx"
    _ok(_cli("convert", source, merged, "--max-cost-ratio", "inf"))
    assert [n.op_type for n in onnx.load(str(merged)).graph.node] == ["Conv"]
    info = _ok(_cli("info", source))
    assert "left apart for cost" in info, info
    result = _cli("convert", source, kept)
    if result.returncode == 0:  # a fold that rewrites each conv alone still keeps two
        assert [n.op_type for n in onnx.load(str(kept)).graph.node] == ["Conv", "Conv"]
    else:
        _error(result, "nothing in", "folds")
        assert not kept.exists()


def test_convert_refuses_to_write_over_its_input(models: dict[str, Path], tmp_path: Path) -> None:
    source = tmp_path / "model.onnx"
    source.write_bytes(models["torchscript"].read_bytes())
    before = source.read_bytes()
    _error(_cli("convert", source, source), "is the input file", "--overwrite-input")
    assert source.read_bytes() == before, "the input changed"
    _ok(_cli("convert", source, source, "--overwrite-input"))
    assert source.read_bytes() != before, "--overwrite-input did not write"
    assert [n.op_type for n in onnx.load(str(source)).graph.node] == ["Conv", "Relu"] * 2


def test_convert_graph_options_and_formats(models: dict[str, Path], tmp_path: Path) -> None:
    deploy = tmp_path / "deploy.npz"
    _error(
        _cli("convert", models["torchscript"], deploy), "unknown file format 'deploy.npz'", ".onnx"
    )
    _error(
        _cli("convert", models["torchscript"], tmp_path / "d.onnx", "--layout", "timm"),
        "--layout does not apply",
        "an ONNX graph",
    )
    _error(
        _cli("convert", models["torchscript"], tmp_path / "d.onnx", "--max-cost-ratio", "0"),
        "--max-cost-ratio must be > 0",
    )
    assert list(tmp_path.iterdir()) == [], "something was written"


def test_checkpoint_options_refused_on_checkpoints(tmp_path: Path) -> None:
    import reparam

    path = tmp_path / "net.npz"
    reparam.save(reparam.RepVGG.create(reparam.Architecture((8, 16), (1, 1)), num_classes=3), path)
    _error(_cli("verify", path, "--shape", "1,3,32,32"), "--shape does not apply", "a checkpoint")
    _error(_cli("convert", path, tmp_path / "d.npz", "--max-cost-ratio", "2"), "--max-cost-ratio")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["net.npz"]


def test_nothing_to_fold_is_an_error(tmp_path: Path) -> None:
    nodes = [helper.make_node("Relu", ["x"], ["y"], name="relu")]
    source = tmp_path / "relu.onnx"
    source.write_bytes(_helper_model(nodes, []).SerializeToString())
    _error(_cli("convert", source, tmp_path / "deploy.onnx"), "nothing in", "nothing was written")
    assert not (tmp_path / "deploy.onnx").exists()


# --------------------------------------------------------------------------- info


def test_info_lists_regions_and_near_misses(models: dict[str, Path]) -> None:
    out = _ok(_cli("info", models["torchscript"]))
    assert "input:         image (batch, 4, 8, 8) float32" in out, out
    assert "2 regions folded; ops 12 -> 4" in out, out
    assert out.count("folded 5 ops into Conv") == 2, out
    out = _ok(_cli("info", models["near_miss"]))
    assert "not folded at" in out and "nonlinearity" in out, out


# --------------------------------------------------------------------------- verify


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_verify_folds_in_memory(models: dict[str, Path], exporter: str) -> None:
    out = _ok(_cli("verify", models[exporter], "--seed", "3"))
    assert "deploy: folded in memory (2 regions)" in out, out
    assert "input: image (1, 4, 8, 8) float32, seed 3" in out, out
    assert f"(tolerance {VERIFY_TOLERANCE[np.dtype(np.float32)]:g})" in out, out
    assert "OK: both graphs agree" in out, out


def test_verify_a_deploy_file(models: dict[str, Path], tmp_path: Path) -> None:
    deploy = tmp_path / "deploy.onnx"
    _ok(_cli("convert", models["torchscript"], deploy))
    out = _ok(_cli("verify", models["torchscript"], deploy))
    assert f"deploy: {deploy}" in out and "OK" in out, out
    # a deploy file that is wrong by one weight fails with exit 1
    broken = onnx.load(str(deploy))
    weight = broken.graph.initializer[0]
    array = numpy_helper.to_array(weight).copy()
    array[0, 0, 1, 1] += 0.5
    weight.CopyFrom(numpy_helper.from_array(array, weight.name))
    bad = tmp_path / "broken.onnx"
    bad.write_bytes(broken.SerializeToString())
    result = _cli("verify", models["torchscript"], bad)
    assert result.returncode == 1, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    assert "FAIL: the deploy graph does not reproduce the train graph" in result.stdout


def test_verify_refuses_the_train_file_as_deploy(models: dict[str, Path]) -> None:
    _error(_cli("verify", models["torchscript"], models["torchscript"]), "is the train file itself")


def test_verify_dynamic_spatial_needs_shape(models: dict[str, Path]) -> None:
    _error(_cli("verify", models["spatial"]), "dynamic dimensions besides the batch", "--shape")
    out = _ok(_cli("verify", models["spatial"], "--shape", "2,4,12,10"))
    assert "image (2, 4, 12, 10) float32" in out and "OK" in out, out
    _error(_cli("verify", models["spatial"], "--shape", "2,3,12,10"), "does not fit input 'image'")


def test_verify_without_onnxruntime(models: dict[str, Path]) -> None:
    code = (
        "import sys; sys.modules['onnxruntime'] = None\n"
        "from reparam.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    result = _cli("verify", models["torchscript"], code=code)
    _error(result, "onnxruntime is not installed", 'pip install "reparam[onnx]"')


# --------------------------------------------------------------------------- refusals and errors


@pytest.mark.parametrize(
    ("command", "instead"),
    [
        ("run", "run the graph with onnxruntime"),
        ("export", "reparam convert"),
        ("demo", "reparam verify"),
        ("quant-report", "onnxruntime.quantization"),
    ],
)
def test_checkpoint_commands_refuse_a_graph(
    models: dict[str, Path], tmp_path: Path, command: str, instead: str
) -> None:
    graph = tmp_path / "model.onnx"
    graph.write_bytes(models["torchscript"].read_bytes())
    np.save(tmp_path / "x.npy", np.zeros((8, 4, 8, 8), np.float32))
    args: dict[str, tuple[str | Path, ...]] = {
        "run": (graph, "--input", tmp_path / "x.npy", "--output", tmp_path / "y.npy"),
        "export": (graph, tmp_path / "out.onnx"),
        "demo": ("--checkpoint", graph, "--data", tmp_path / "x.npz"),
        "quant-report": (graph, "--calibration", tmp_path / "x.npy", "--json", tmp_path / "q.json"),
    }
    before = sorted(p.name for p in tmp_path.iterdir())
    _error(_cli(command, *args[command]), "is an ONNX graph", instead)
    assert sorted(p.name for p in tmp_path.iterdir()) == before, "something was written"


def _external(tmp_path: Path, location: str, *, cut: bool = False) -> Path:
    model = _two_convs()
    tensor = model.graph.initializer[0]
    data = bytes(tensor.raw_data)
    tensor.ClearField("raw_data")
    tensor.data_location = TensorProto.EXTERNAL
    entry = tensor.external_data.add()
    entry.key, entry.value = "location", location
    if not location.startswith(("/", "..")):
        (tmp_path / location).write_bytes(data[:50] if cut else data)
    path = tmp_path / "train.onnx"
    path.write_bytes(model.SerializeToString())
    return path


def _bad_model(tmp_path: Path, case: str) -> Path:
    path = tmp_path / "train.onnx"
    model = _two_convs()
    if case == "truncated":
        data = model.SerializeToString()
        path.write_bytes(data[: len(data) - 40])
    elif case == "not onnx":
        path.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(100))
    elif case == "old opset":
        path.write_bytes(_two_convs(opset=11).SerializeToString())
    elif case == "missing tensor":
        model.graph.node[2].input[1] = "ghost"
        path.write_bytes(model.SerializeToString())
    elif case == "cycle":
        model.graph.node[0].input[0] = "y"
        path.write_bytes(model.SerializeToString())
    elif case == "outside":
        path = _external(tmp_path, "../../etc/passwd")
    elif case == "short data":
        path = _external(tmp_path, "train.onnx.data", cut=True)
    return path


@pytest.mark.parametrize(
    ("case", "fragments"),
    [
        ("truncated", ("train.onnx is not an ONNX model",)),
        ("not onnx", ("train.onnx is not an ONNX model",)),
        ("old opset", ("uses opset 11 of the default domain; expected 13 or newer",)),
        ("missing tensor", ("node 'sum' (Add) reads tensor 'ghost'",)),
        ("cycle", ("cycle through nodes",)),
        ("outside", ("'../../etc/passwd', outside the model's directory; refused",)),
        ("short data", ("holds 50 bytes at offset 0", "expected 576")),
    ],
)
@pytest.mark.parametrize("command", ["convert", "verify", "info"])
def test_bad_graphs_exit_2(
    tmp_path: Path,
    case: str,
    fragments: tuple[str, ...],
    command: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """In process (``main``), for speed; the subprocess tests above cover the real entry."""
    path = _bad_model(tmp_path, case)
    deploy = tmp_path / "deploy.onnx"
    args = (path, deploy) if command == "convert" else (path,)
    before = sorted(p.name for p in tmp_path.iterdir())
    code = main([command, *map(str, args)])
    out, err = capsys.readouterr()
    line = _error(subprocess.CompletedProcess([], code, out, err), *fragments)
    assert line.startswith(f"reparam {command}: error: load: "), line
    assert not deploy.exists(), "the output was written"
    assert sorted(p.name for p in tmp_path.iterdir()) == before, "something was written"


def test_missing_external_data_file_exits_2(tmp_path: Path) -> None:
    path = _external(tmp_path, "train.onnx.data")
    (tmp_path / "train.onnx.data").unlink()
    _error(_cli("convert", path, tmp_path / "deploy.onnx"), "train.onnx.data", "No such file")
    assert not (tmp_path / "deploy.onnx").exists()
