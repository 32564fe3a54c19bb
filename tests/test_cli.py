"""The command line, run as a real subprocess: ``python -m reparam ...``."""

from __future__ import annotations

import subprocess
import sys
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from tolerances import assert_close

import reparam
from reparam import Architecture, RepVGG
from reparam.checkpoints import to_state_dict, write_tensors
from reparam.cli import main

# The digits model's shape: stage0 1->16, stage1 two blocks 16->32, stage2 two blocks 32->64.
DIGITS = Architecture(widths=(16, 32, 64), depths=(1, 2, 2))


def _cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "reparam", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def _ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result.stdout


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A randomly initialised digits-shaped model (npz and safetensors) and test data."""
    root = tmp_path_factory.mktemp("digits")
    model = RepVGG.create(DIGITS, num_classes=10, seed=0, in_channels=1)
    paths = {"npz": root / "train.npz", "safetensors": root / "train.safetensors"}
    for path in paths.values():
        reparam.save(model, path)
    rng = np.random.default_rng(0)
    paths["data"] = root / "test.npz"
    np.savez(
        paths["data"],
        images=rng.standard_normal((20, 1, 16, 16)).astype(np.float32),
        labels=rng.integers(0, 10, 20),
    )
    return paths


# ------------------------------------------------------------------- the commands


@pytest.mark.parametrize("suffixes", [("npz", ".safetensors"), ("safetensors", ".npz")])
def test_convert(digits: dict[str, Path], tmp_path: Path, suffixes: tuple[str, str]) -> None:
    source, target_suffix = suffixes
    target = tmp_path / f"deploy{target_suffix}"
    out = _ok(_cli("convert", digits[source], target))
    assert "fused 5 blocks (5 with a 1x1 branch, 2 with an identity branch)" in out, out
    train = reparam.load(digits[source])
    assert f"train {train.num_parameters:,}" in out, out
    deploy = reparam.load(target)
    assert deploy.form == "deploy" and f"deploy {deploy.num_parameters:,}" in out, out
    x = np.random.default_rng(1).standard_normal((3, 1, 16, 16)).astype(np.float32)
    assert_close(deploy(x), train(x), dtype=np.float32, what="converted file")


def test_convert_timm_layout_keeps_the_layout(tmp_path: Path) -> None:
    model = RepVGG.create(DIGITS, num_classes=10, in_channels=1)
    source = tmp_path / "timm.safetensors"
    reparam.save(model, source, layout="timm")
    target = tmp_path / "timm_deploy.npz"
    _ok(_cli("convert", source, target, "--layout", "timm"))
    with np.load(target) as saved:
        keys = set(saved.files)
    assert "stem.reparam_conv.weight" in keys and "head.fc.bias" in keys, sorted(keys)


def test_verify(digits: dict[str, Path]) -> None:
    out = _ok(_cli("verify", digits["npz"], "--batch", "3", "--seed", "4"))
    assert "input: batch 3, 32x32, seed 4" in out, out
    assert "top-1 agreement      = 100%" in out and "OK: both forms agree" in out, out


def test_verify_published_architecture_default_size(tmp_path: Path) -> None:
    path = tmp_path / "a0.npz"
    reparam.save(RepVGG.create("A0", num_classes=10, dtype=np.float64), path)
    out = _ok(_cli("verify", path, "--arch", "A0", "--batch", "1"))
    assert "RepVGG-A0" in out and "64x64" in out and "OK" in out, out


def test_verify_reports_disagreement_with_exit_1(
    digits: dict[str, Path], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """In process: a deliberately broken conversion must fail verification."""
    original = RepVGG.reparameterize

    def broken(self: RepVGG) -> RepVGG:
        deploy = original(self)
        weight = deploy.head.weight.copy()
        weight[0] += 0.1
        return RepVGG(deploy.blocks, reparam.Head(weight, deploy.head.bias))

    monkeypatch.setattr(RepVGG, "reparameterize", broken)
    assert main(["verify", str(digits["npz"])]) == 1, "a broken conversion passed"
    assert "FAIL" in capsys.readouterr().out, "no FAIL line"


@pytest.mark.parametrize("form", ["train", "deploy"])
def test_run(digits: dict[str, Path], tmp_path: Path, form: str) -> None:
    weights = digits["npz"]
    if form == "deploy":
        weights = tmp_path / "deploy.safetensors"
        reparam.save(reparam.load(digits["npz"]).reparameterize(), weights)
    x = np.random.default_rng(2).standard_normal((4, 1, 16, 12)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    out = _ok(_cli("run", weights, "--input", tmp_path / "x.npy", "--output", tmp_path / "y.npy"))
    assert f"{form} form" in out, out
    logits = np.load(tmp_path / "y.npy")
    expected = reparam.load(weights)(x)
    np.testing.assert_array_equal(logits, expected, err_msg=f"{form}: saved logits")


def test_info_on_a0_deploy(tmp_path: Path) -> None:
    path = tmp_path / "a0_deploy.safetensors"
    reparam.save(RepVGG.create("A0").reparameterize(), path)
    out = _ok(_cli("info", path))
    for line in (
        "layout:        official",
        "form:          deploy",
        "architecture:  RepVGG-A0",
        "blocks:        22",
        "(8.31 M)",
        "multiply-adds: 1.36 G at 224x224 (deploy form)",
    ):
        assert line in out, f"{line!r} not in:\n{out}"


def test_info_on_a_custom_train_model(digits: dict[str, Path]) -> None:
    out = _ok(_cli("info", digits["npz"]))
    assert "architecture:  custom" in out and "form:          train" in out, out
    assert "deploy form" in out, out


# ------------------------------------------------------------------- the demo


def _embedded(name: str) -> Path:
    return Path(str(resources.files("reparam").joinpath("data", name)))


def test_demo_on_a_given_checkpoint(digits: dict[str, Path]) -> None:
    out = _ok(_cli("demo", "--checkpoint", digits["npz"], "--data", digits["data"]))
    assert "identical predictions: 20/20" in out, out
    assert "train" in out and "deploy" in out and "max |train - deploy|" in out, out


@pytest.mark.skipif(
    not (_embedded("digits_repvgg.npz").is_file() and _embedded("digits_test.npz").is_file()),
    reason="the bundled digits checkpoint (reparam/data/*.npz) is not there yet",
)
def test_demo_on_the_bundled_digits() -> None:
    result = _cli("demo")
    out = _ok(result)
    with np.load(_embedded("digits_test.npz")) as data:
        count = len(data["labels"])
    assert f"identical predictions: {count}/{count}" in out, out
    assert "classifying" in result.stderr, "no progress on stderr"


# ------------------------------------------------------------------- errors: exit 2, one line


def _bad_checkpoint(tmp_path: Path, case: str) -> Path:
    tensors: dict[str, Any] = dict(
        to_state_dict(RepVGG.create(DIGITS, num_classes=10, in_channels=1))
    )
    if case == "missing key":
        del tensors["stage1.1.rbr_identity.running_var"]
    elif case == "unexpected key":
        tensors["stage1.1.rbr_dense.scale"] = np.ones(2, np.float32)
    elif case == "shape mismatch":
        tensors["linear.weight"] = np.ones((10, 63), np.float32)
    elif case == "branches disagree":
        tensors["stage2.0.rbr_1x1.conv.weight"] = np.ones((64, 16, 1, 1), np.float32)
    path = tmp_path / "bad.npz"
    write_tensors(path, tensors)
    return path


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("missing key", "missing key stage1.1.rbr_identity.running_var"),
        ("unexpected key", "unexpected key stage1.1.rbr_dense.scale"),
        ("shape mismatch", "shape mismatch: linear.weight has shape (10, 63)"),
        ("branches disagree", "shape mismatch: stage2.0.rbr_1x1.conv.weight"),
    ],
)
@pytest.mark.parametrize("command", ["convert", "verify", "run", "info"])
def test_bad_checkpoints_exit_2(tmp_path: Path, case: str, message: str, command: str) -> None:
    path = _bad_checkpoint(tmp_path, case)
    np.save(tmp_path / "x.npy", np.zeros((1, 1, 16, 16), np.float32))
    args: dict[str, tuple[str | Path, ...]] = {
        "convert": (path, tmp_path / "out.npz"),
        "verify": (path,),
        "run": (path, "--input", tmp_path / "x.npy", "--output", tmp_path / "y.npy"),
        "info": (path,),
    }
    before = sorted(p.name for p in tmp_path.iterdir())
    result = _cli(command, *args[command])
    assert result.returncode == 2, f"{case}: exit {result.returncode}\n{result.stderr}"
    assert message in result.stderr, f"{message!r} not in stderr:\n{result.stderr}"
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if "error" in line]
    assert len(errors) == 1, f"expected one error line:\n{result.stderr}"
    assert sorted(p.name for p in tmp_path.iterdir()) == before, "something was written"


def test_unknown_suffix_exits_2(digits: dict[str, Path], tmp_path: Path) -> None:
    result = _cli("convert", digits["npz"], tmp_path / "deploy.onnx")
    assert result.returncode == 2, result.stderr
    assert "unknown file format 'deploy.onnx'" in result.stderr, result.stderr
    assert list(tmp_path.iterdir()) == [], "something was written"
    weights = tmp_path / "weights.bin"
    weights.write_bytes(b"")
    result = _cli("info", weights)
    assert result.returncode == 2 and "unknown file format" in result.stderr, result.stderr


def test_missing_file_exits_2(tmp_path: Path) -> None:
    result = _cli("convert", tmp_path / "absent.npz", tmp_path / "deploy.npz")
    assert result.returncode == 2, result.stderr
    assert "absent.npz: No such file or directory" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert list(tmp_path.iterdir()) == [], "something was written"


def test_wrong_arch_exits_2(digits: dict[str, Path]) -> None:
    result = _cli("verify", digits["npz"], "--arch", "RepVGG-A0")
    assert result.returncode == 2, result.stderr
    assert "not RepVGG-A0" in result.stderr and "more" in result.stderr, result.stderr


def test_usage_errors_exit_2() -> None:
    result = _cli("verify")
    assert result.returncode == 2 and "usage" in result.stderr, result.stderr
    assert main(["convert"]) == 2, "main() must return argparse's exit code"


def test_deploy_checkpoints_cannot_be_converted_or_verified(
    digits: dict[str, Path], tmp_path: Path
) -> None:
    deploy = tmp_path / "deploy.npz"
    reparam.save(reparam.load(digits["npz"]).reparameterize(), deploy)
    result = _cli("convert", deploy, tmp_path / "again.npz")
    assert result.returncode == 2 and "already in deploy form" in result.stderr, result.stderr
    result = _cli("verify", deploy)
    assert result.returncode == 2 and "expected the train-form" in result.stderr, result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["deploy.npz"], "something was written"


def test_run_with_the_wrong_input_exits_2(digits: dict[str, Path], tmp_path: Path) -> None:
    np.save(tmp_path / "x.npy", np.zeros((2, 3, 16, 16), np.float32))
    result = _cli(
        "run", digits["npz"], "--input", tmp_path / "x.npy", "--output", tmp_path / "y.npy"
    )
    assert result.returncode == 2, result.stderr
    assert "x has 3 channels" in result.stderr and "(N, 1, H, W)" in result.stderr, result.stderr
    assert not (tmp_path / "y.npy").exists(), "logits written despite the error"
