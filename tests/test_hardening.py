"""Issue 10: the command line never loses data, never says OK about garbage, and every error is
one line that names the file and the tensor.

Items about the command line run it as a user does (``python -m reparam`` in a subprocess) and
check the exit code, the one error line on stderr and what is (not) left on disk. Items about file
formats run in process. The last test is a property: every ``ReparamError`` the command line
raises for a damaged checkpoint fits on one line of at most 300 characters.
"""

from __future__ import annotations

import io
import os
import re
import resource
import signal
import stat
import subprocess
import sys
import zipfile
from collections.abc import Callable
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

import reparam
from reparam import Architecture, ReparamError, RepVGG
from reparam.checkpoints import formats, read_tensors, to_state_dict, write_tensors
from reparam.checkpoints.repvgg import load_file
from reparam.cli import _dispatch, _parser, error_line, main
from reparam.export.onnx import export_onnx

# Small enough to load in milliseconds, with 1x1 and identity branches: 1 -> 4 -> 8 -> 8.
SMALL = Architecture(widths=(4, 8, 8), depths=(1, 2, 1))
MAX_LINE = 300


def _model(seed: int = 0) -> RepVGG:
    return RepVGG.create(SMALL, num_classes=3, seed=seed, in_channels=1)


# JAX (loaded by other test modules in the same pytest process) warns at every os.fork(), which a
# subprocess with preexec_fn uses; the child only sets a umask or an rlimit and execs at once.
_FORK_WARNING = pytest.mark.filterwarnings("ignore:os.fork\\(\\) was called:RuntimeWarning")


def _cli(
    *args: str | Path, preexec_fn: Callable[[], None] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "reparam", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        preexec_fn=preexec_fn,  # only sets a umask or an rlimit in the child
    )


def _error(result: subprocess.CompletedProcess[str], *needles: str) -> str:
    """Assert exit 2 and one error line (the last on stderr) containing every needle."""
    assert result.returncode == 2, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.splitlines()
    errors = [line for line in lines if "error:" in line]
    assert len(errors) == 1 and lines[-1] == errors[0], f"not one error line:\n{result.stderr}"
    line = errors[0]
    assert len(line) <= MAX_LINE, f"{len(line)} characters:\n{line}"
    for needle in needles:
        assert needle in line, f"{needle!r} not in:\n{line}"
    return line


def _listing(directory: Path) -> dict[str, bytes]:
    """Every entry of ``directory`` and its bytes (empty for a directory)."""
    return {p.name: b"" if p.is_dir() else p.read_bytes() for p in sorted(directory.iterdir())}


@pytest.fixture
def train(tmp_path: Path) -> Path:
    path = tmp_path / "train.npz"
    reparam.save(_model(), path)
    np.save(tmp_path / "x.npy", np.zeros((2, 1, 12, 12), np.float32))
    return path


def _damaged(tmp_path: Path, key: str, change: Callable[[np.ndarray], None]) -> Path:
    tensors = {k: np.array(v) for k, v in to_state_dict(_model()).items()}
    change(tensors[key])
    path = tmp_path / "damaged.npz"
    write_tensors(path, tensors)
    np.save(tmp_path / "x.npy", np.zeros((2, 1, 12, 12), np.float32))
    return path


_COMMANDS = ("convert", "verify", "run", "info", "export")


def _commands(path: Path, tmp_path: Path) -> dict[str, tuple[str | Path, ...]]:
    return {
        "convert": ("convert", path, tmp_path / "out.npz"),
        "verify": ("verify", path),
        "run": ("run", path, "--input", tmp_path / "x.npy", "--output", tmp_path / "y.npy"),
        "info": ("info", path),
        "export": ("export", path, tmp_path / "out.onnx"),
    }


# ------------------------------------------------------------------- data loss and wrong answers


@pytest.mark.parametrize("command", _COMMANDS)
def test_non_finite_weights_are_an_error_for_every_command(tmp_path: Path, command: str) -> None:
    def poison(kernel: np.ndarray) -> None:
        kernel[0, 0, 0, :] = [np.nan, np.inf, -np.inf]

    path = _damaged(tmp_path, "stage1.0.rbr_dense.conv.weight", poison)
    before = _listing(tmp_path)
    _error(
        _cli(*_commands(path, tmp_path)[command]),
        "damaged.npz",
        "stage1.0.rbr_dense.conv.weight has 3 non-finite values (NaN or inf) of 288",
    )
    assert _listing(tmp_path) == before, "something was written"


def test_verify_never_says_ok_about_non_finite_logits(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Finite weights whose logits overflow float32: both forms give inf, which is no agreement."""
    model = _model()
    head = reparam.Head(np.full_like(model.head.weight, 3e38), model.head.bias)
    path = tmp_path / "overflow.npz"
    reparam.save(RepVGG(model.blocks, head), path)
    assert main(["verify", str(path)]) == 1, "verify passed on infinite logits"
    out = capsys.readouterr().out
    assert "FAIL: the logits are not finite" in out and "OK" not in out, out


@pytest.mark.parametrize("how", ["same path", "symlink", "hard link"])
def test_convert_refuses_to_overwrite_its_input(train: Path, how: str) -> None:
    output = train
    if how == "symlink":
        output = train.with_name("link.npz")
        output.symlink_to(train.name)
    elif how == "hard link":
        output = train.with_name("hard.npz")
        os.link(train, output)
    before = _listing(train.parent)
    result = _cli("convert", train, output)
    _error(result, f"the output {output} is the input file", "--overwrite-input")
    assert "loading" not in result.stderr, f"refused only after loading:\n{result.stderr}"
    assert _listing(train.parent) == before, "the input was touched"


def test_run_refuses_to_write_the_logits_over_its_input(train: Path) -> None:
    images = train.with_name("x.npy")
    before = _listing(train.parent)
    _error(
        _cli("run", train, "--input", images, "--output", images),
        f"run: the --output {images} is the --input file",
    )
    assert _listing(train.parent) == before, "the input was touched"


def test_convert_overwrites_its_input_when_told_and_keeps_the_mode(train: Path) -> None:
    train.chmod(0o640)
    result = _cli("convert", train, train, "--overwrite-input")
    assert result.returncode == 0, result.stderr
    assert reparam.load(train).form == "deploy", "the input was not replaced"
    assert stat.S_IMODE(train.stat().st_mode) == 0o640, oct(train.stat().st_mode)


@_FORK_WARNING
def test_convert_gives_new_files_the_umask_and_keeps_an_old_files_mode(train: Path) -> None:
    new, old = train.with_name("new.npz"), train.with_name("old.npz")
    old.write_bytes(b"previous")
    old.chmod(0o604)
    for output in (new, old):
        result = _cli("convert", train, output, preexec_fn=lambda: os.umask(0o027) and None)
        assert result.returncode == 0, result.stderr
    assert stat.S_IMODE(new.stat().st_mode) == 0o640, f"new file {oct(new.stat().st_mode)}"
    assert stat.S_IMODE(old.stat().st_mode) == 0o604, f"replaced file {oct(old.stat().st_mode)}"
    assert reparam.load(old).form == "deploy", "the old file was not replaced"


def _write_each_format(directory: Path) -> list[Path]:
    model = _model()
    paths = [directory / f"w{suffix}" for suffix in (".npz", ".safetensors", ".pth")]
    for path in paths:
        reparam.save(model, path)
    formats.save_array(directory / "y.npy", np.ones(3))
    export_onnx(model, directory / "m.onnx")
    return [*paths, directory / "y.npy", directory / "m.onnx"]


def test_every_writer_uses_the_umask_and_keeps_modes(tmp_path: Path) -> None:
    previous = os.umask(0o022)
    try:
        written = _write_each_format(tmp_path)
        modes = {path.name: stat.S_IMODE(path.stat().st_mode) for path in written}
        assert set(modes.values()) == {0o644}, f"new files: {modes}"
        for path in written:
            path.chmod(0o660)
        _write_each_format(tmp_path)
        modes = {path.name: stat.S_IMODE(path.stat().st_mode) for path in written}
        assert set(modes.values()) == {0o660}, f"replaced files: {modes}"
    finally:
        os.umask(previous)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in written), "stray"


# ------------------------------------------------------------------- errors a user can act on


def _pickled_npy(path: Path) -> None:
    np.save(path, np.array([{"a": 1}], dtype=object), allow_pickle=True)


def _truncated_npy(path: Path) -> None:
    buffer = io.BytesIO()
    np.save(buffer, np.zeros((2, 1, 12, 12), np.float32))
    path.write_bytes(buffer.getvalue()[:300])


@pytest.mark.parametrize(
    ("case", "make", "message"),
    [
        ("pickled", _pickled_npy, "holds pickled Python objects, which reparam does not load"),
        ("truncated", _truncated_npy, "declares shape (2, 1, 12, 12) (1,152 bytes of float32)"),
        ("corrupt", lambda p: p.write_bytes(b"\x93NUMPY garbage"), "cannot parse"),
    ],
)
def test_run_with_a_bad_input_file(
    train: Path, case: str, make: Callable[[Path], None], message: str
) -> None:
    bad = train.with_name(f"{case}.npy")
    make(bad)
    output = train.with_name("y.npy")
    _error(_cli("run", train, "--input", bad, "--output", output), f"{bad}", message)
    assert not output.exists(), "logits written despite the error"


@pytest.mark.parametrize("missing", ["images", "labels"])
def test_demo_with_data_lacking_an_array(train: Path, missing: str) -> None:
    data = train.with_name("data.npz")
    arrays = {"images": np.zeros((2, 1, 12, 12), np.float32), "labels": np.zeros(2, np.int64)}
    del arrays[missing]
    np.savez(data, **arrays)
    _error(
        _cli("demo", "--checkpoint", train, "--data", data),
        f"demo: {data} has no {missing} array",
        "expected an .npz with images (N, C, H, W) and labels (N,)",
    )


def test_ctrl_c_exits_130_quietly(train: Path) -> None:
    process = subprocess.Popen(
        [sys.executable, "-m", "reparam", "verify", train, "--batch", "4", "--size", "768"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stderr is not None
    progress = []
    while not progress or "running" not in progress[-1]:
        line = process.stderr.readline()
        assert line, f"verify ended early: {progress}"
        progress.append(line)
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=60)
    assert process.returncode == 130, f"exit {process.returncode}\n{out}\n{err}"
    assert err == "" and "OK" not in out, f"not quiet:\n{err}"


def test_broken_pipe_ends_quietly(train: Path) -> None:
    """``reparam info X | head -0``: stdout is closed before reparam writes to it."""
    process = subprocess.Popen(
        [sys.executable, "-m", "reparam", "info", train],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None and process.stderr is not None
    process.stdout.close()
    with process.stderr:
        err = process.stderr.read()
    process.wait(timeout=60)
    assert process.returncode in (0, 141), f"exit {process.returncode}\n{err}"
    assert err.splitlines() == [f"loading {train} ..."], f"not quiet:\n{err}"


def test_os_error_while_parsing_is_not_an_access_problem(tmp_path: Path) -> None:
    """A .pth cut past its start raises OSError inside torch: that is damage, not access."""
    path = tmp_path / "cut.pth"
    buffer = io.BytesIO()
    torch.save(
        {k: torch.from_numpy(np.array(v)) for k, v in to_state_dict(_model()).items()}, buffer
    )
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    line = _error(_cli("info", path), f"cannot parse {path} as a PyTorch checkpoint")
    assert "permissions" not in line and "cannot access" not in line, line


def test_access_error_names_the_file(tmp_path: Path) -> None:
    folder = tmp_path / "folder.npz"
    folder.mkdir()
    _error(_cli("info", folder), f"cannot read {folder}: Is a directory; check the path")


@pytest.mark.parametrize(
    ("command", "problem"),
    [
        ("convert-missing-directory", "its directory {root}/absent does not exist"),
        ("convert-directory", "the output {root}/out.npz is a directory"),
        ("run-directory", "the --output {root}/out.npz is a directory"),
        ("export-missing-directory", "cannot write the output {root}/absent/m.onnx"),
    ],
)
def test_output_is_checked_before_loading(train: Path, command: str, problem: str) -> None:
    root = train.parent
    (root / "out.npz").mkdir()
    args = {
        "convert-missing-directory": ("convert", train, root / "absent" / "deploy.npz"),
        "convert-directory": ("convert", train, root / "out.npz"),
        "run-directory": ("run", train, "--input", root / "x.npy", "--output", root / "out.npz"),
        "export-missing-directory": ("export", train, root / "absent" / "m.onnx"),
    }
    before = _listing(root)
    result = _cli(*args[command])
    _error(result, problem.format(root=root))
    assert "loading" not in result.stderr, f"checked only after loading:\n{result.stderr}"
    assert _listing(root) == before, "something was written"


@_FORK_WARNING
def test_failed_write_names_the_file(train: Path) -> None:
    """A file-size limit stops the write: the user's path is named, nothing is left behind."""
    limit = 2048  # bytes: the deploy checkpoint needs about 7 kB
    output = train.with_name("deploy.npz")
    before = _listing(train.parent)
    result = _cli(
        "convert",
        train,
        output,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)),
    )
    _error(result, f"cannot write {output}: File too large")
    assert _listing(train.parent) == before, "a partial or temporary file was left"


def test_bad_batchnorm_values_name_the_tensor_and_block(tmp_path: Path) -> None:
    def negative(var: np.ndarray) -> None:
        var[3] = -1.0

    path = _damaged(tmp_path, "stage1.1.rbr_identity.running_var", negative)
    _error(
        _cli("info", path),
        "stage1.1.rbr_identity: BatchNorm: var must be >= 0 (a variance); got -1.0 at channel 3",
    )


def test_batchnorm_errors_of_the_model_layer_name_the_block() -> None:
    """With eps=0 a zero variance divides by zero; BatchNorm's own error gets the location."""
    tensors = {k: np.array(v) for k, v in to_state_dict(_model(), layout="timm").items()}
    tensors["stages.0.1.identity.running_var"][2] = 0.0
    with pytest.raises(ReparamError) as info:
        reparam.checkpoints.from_state_dict(tensors, eps=0.0)
    message = str(info.value)
    assert message.startswith(
        "from_state_dict: the state dict does not fit a RepVGG (timm layout): "
        "stages.0.1.identity: BatchNorm: var + eps must be > 0"
    ), message


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pth_is_refused_without_torchs_advice(tmp_path: Path) -> None:
    path, marker = tmp_path / "evil.pth", tmp_path / "ran"
    torch.save({"stage0.rbr_dense.conv.weight": _Payload(marker)}, path)
    line = _error(
        _cli("info", path),
        f"load: {path} holds pickled Python objects (posix.system) that reparam will not execute",
    )
    assert "weights_only" not in line and "likely succeed" not in line, line
    assert not marker.exists(), "the pickled code ran"


def test_info_hint_names_an_option_info_has(tmp_path: Path) -> None:
    path = tmp_path / "other.npz"
    np.savez(path, **{"features.0.weight": np.ones((2, 1, 3, 3), np.float32)})
    line = _error(_cli("info", path), f"load: {path}: the keys match no network layout", "--layout")
    assert "layout=" not in line.split("--layout")[0], f"the option comes first:\n{line}"
    result = _cli("info", path, "--layout", "timm")
    _error(result, "unexpected key features.0.weight")


def test_opset_is_checked_before_loading(tmp_path: Path) -> None:
    absent = tmp_path / "absent.npz"
    _error(
        _cli("export", absent, tmp_path / "m.onnx", "--opset", "5"),
        "export: opset out of range; got 5, expected an int from 13",
    )


def test_version() -> None:
    result = _cli("--version")
    assert result.returncode == 0 and result.stdout == f"reparam {reparam.__version__}\n", result


def test_pth_with_an_older_pickle_protocol_loads_without_torch_warnings(tmp_path: Path) -> None:
    path = tmp_path / "protocol3.pth"
    state = {k: torch.from_numpy(np.array(v)) for k, v in to_state_dict(_model()).items()}
    torch.save(state, path, pickle_protocol=3)
    result = _cli("info", path)
    assert result.returncode == 0, result.stderr
    assert result.stderr.splitlines() == [f"loading {path} ..."], result.stderr


# ------------------------------------------------------------------- formats a user has


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_safetensors_need_no_torch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype
) -> None:
    from safetensors.torch import save_file

    state = {k: torch.from_numpy(np.array(v)).to(dtype) for k, v in to_state_dict(_model()).items()}
    path = tmp_path / "half.safetensors"
    save_file(state, path)
    expected = {key: tensor.float().numpy() for key, tensor in state.items()}
    monkeypatch.setitem(sys.modules, "torch", None)
    monkeypatch.setitem(sys.modules, "safetensors", None)
    monkeypatch.setitem(sys.modules, "safetensors.numpy", None)
    model, stored = load_file(path)
    assert stored == (str(dtype).removeprefix("torch."),), f"stored {stored}"
    assert model.dtype == np.float32, model
    for key, array in read_tensors(path).items():
        widened = array.astype(np.float32)
        np.testing.assert_array_equal(
            widened.view(np.uint32), expected[key].view(np.uint32), err_msg=f"{key} not exact"
        )


def test_bfloat16_widening_is_exact_for_every_bit_pattern() -> None:
    bits = np.arange(2**16, dtype=np.uint16)
    ours = formats._bfloat16_to_float32(bits)
    theirs = torch.from_numpy(bits.view(np.int16).copy()).view(torch.bfloat16).float().numpy()
    np.testing.assert_array_equal(ours.view(np.uint32), theirs.view(np.uint32), err_msg="bits")


def test_info_says_what_the_file_held(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    state = {
        k: torch.from_numpy(np.array(v)).bfloat16().contiguous()
        for k, v in to_state_dict(_model()).items()
    }
    path = tmp_path / "bf16.safetensors"
    save_file(state, path)
    result = _cli("info", path)
    assert result.returncode == 0, result.stderr
    assert "dtype:         float32 (the file holds bfloat16)" in result.stdout, result.stdout


def test_to_layout_writes_the_other_layout(train: Path) -> None:
    output = train.with_name("timm.safetensors")
    result = _cli("convert", train, output, "--to-layout", "timm")
    assert result.returncode == 0 and "(timm layout)" in result.stdout, result.stderr
    keys = set(read_tensors(output))
    assert "stem.reparam_conv.weight" in keys and "head.fc.bias" in keys, sorted(keys)


def test_forcing_the_wrong_input_layout_is_one_capped_line(train: Path) -> None:
    line = _error(
        _cli("convert", train, train.with_name("out.npz"), "--layout", "timm"),
        "does not fit a RepVGG (timm layout): unexpected key stage0.rbr_dense.conv.weight",
        "more; hint: the keys are in the official layout (see --layout)",
    )
    assert line.count("unexpected key") <= 3, line


@pytest.mark.parametrize(
    "wrap",
    [
        lambda t: {f"_orig_mod.{k}": v for k, v in t.items()},
        lambda t: {"model_state_dict": t, "optimizer_state_dict": {}, "epoch": 3},
        lambda t: {"state_dict": {f"module._orig_mod.{k}": v for k, v in t.items()}},
    ],
    ids=["torch.compile", "model_state_dict", "ddp+compile"],
)
def test_wrappers_and_prefixes_are_unwrapped(tmp_path: Path, wrap: Callable[[Any], Any]) -> None:
    model = _model()
    tensors = {k: torch.from_numpy(np.array(v)) for k, v in to_state_dict(model).items()}
    path = tmp_path / "wrapped.pth"
    torch.save(wrap(tensors), path)
    loaded = reparam.load(path)
    x = np.random.default_rng(0).standard_normal((1, 1, 12, 12)).astype(np.float32)
    np.testing.assert_array_equal(loaded(x), model(x), err_msg="different weights")


def _zip_bomb(path: Path, member: str, nbytes: int) -> None:
    """An .npz whose one float32 member inflates to ``nbytes`` of zeros."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        header, {"descr": "<f4", "fortran_order": False, "shape": (nbytes // 4,)}
    )
    with (
        zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as archive,
        archive.open(member, "w", force_zip64=True) as stream,
    ):
        stream.write(header.getvalue())
        chunk = bytes(2**20)
        for _ in range(nbytes // len(chunk)):
            stream.write(chunk)


@pytest.fixture
def no_array_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("an array was read")

    monkeypatch.setattr(np.lib.format, "read_array", refuse)


@pytest.mark.usefixtures("no_array_reads")
def test_zip_bomb_with_foreign_names_is_refused_by_name(tmp_path: Path) -> None:
    path = tmp_path / "bomb.npz"
    _zip_bomb(path, "payload.npy", 16 * 2**20)
    with pytest.raises(ReparamError, match="the keys match no network layout"):
        reparam.load(path)


@pytest.mark.usefixtures("no_array_reads")
def test_zip_bomb_with_checkpoint_names_is_refused_by_size(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(formats, "INFLATION_FLOOR", 2**20)  # a 16 MB bomb stands in for 2 GB
    path = tmp_path / "bomb.npz"
    _zip_bomb(path, "stage0.rbr_dense.conv.weight.npy", 16 * 2**20)
    with pytest.raises(ReparamError, match="refusing to inflate a likely zip bomb"):
        reparam.load(path)


@pytest.mark.usefixtures("no_array_reads")
def test_npz_member_whose_header_lies_about_its_size(tmp_path: Path) -> None:
    path = tmp_path / "lie.npz"
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        header, {"descr": "<f4", "fortran_order": False, "shape": (10**9,)}
    )
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("stage0.rbr_dense.conv.weight.npy", header.getvalue() + bytes(16))
    with pytest.raises(ReparamError, match=r"declares shape \(1000000000,\)"):
        reparam.load(path)


def test_zip_bomb_from_the_command_line(tmp_path: Path) -> None:
    path = tmp_path / "bomb.npz"
    _zip_bomb(path, "payload.npy", 8 * 2**20)
    _error(_cli("info", path), f"load: {path}: the keys match no network layout")


# ------------------------------------------------------------------- property: one short line


_FOREIGN_KEYS = st.one_of(
    st.text(st.characters(exclude_characters="\x00", exclude_categories=("Cs",)), min_size=1),
    st.builds(
        "stage{}.{}.rbr_dense.conv.weight".format, st.integers(1, 10**12), st.integers(0, 10**12)
    ),
    st.builds("stages.{}.{}.conv_kxk.bn.weight".format, st.integers(0, 10**12), st.integers(0, 9)),
)
_DEFECTS = ("delete", "add", "reshape", "non-finite", "negative var", "integer", "prefix")


def _defect(draw: st.DrawFn, tensors: dict[str, np.ndarray], touched: set[str]) -> str:
    """Damage the state dict in place, one way drawn at random; return what was done.

    Keys damaged before (``touched``, which also holds every original key's name once it is
    gone) are left alone, so that no defect undoes another.
    """
    keys = sorted(k for k in tensors if k not in touched)
    key = draw(st.sampled_from(keys))
    touched.add(key)
    kind = draw(st.sampled_from(_DEFECTS))
    block = re.match(r"(stage0|stage\d+\.\d+|stem|stages\.\d+\.\d+)\.", key)
    if kind == "delete" and block and sum(k.startswith(block.group(0)) for k in tensors) == 1:
        kind = "reshape"  # without its last key a block is gone, and fewer blocks may be valid
    if kind == "delete":
        del tensors[key]
    elif kind == "add":
        key = draw(_FOREIGN_KEYS.filter(lambda k: k not in tensors and k not in touched))
        touched.add(key)
        assume(not key.endswith("num_batches_tracked"))  # the one key that is ignored
        tensors[key] = np.ones(draw(st.integers(0, 3)), np.float32)
    elif kind == "reshape":
        tensors[key] = np.ones(tensors[key].size + draw(st.integers(1, 3)), np.float32)
    elif kind == "non-finite":
        tensors[key] = tensors[key].astype(np.float32)
        index = draw(st.integers(0, tensors[key].size - 1))
        tensors[key].flat[index] = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
    elif kind == "negative var":
        variances = [k for k in keys if k.endswith("running_var")] or keys  # deploy: any tensor
        key = draw(st.sampled_from(variances))
        touched.add(key)
        tensors[key] = tensors[key].astype(np.float32)
        tensors[key].flat[0] = -draw(st.floats(1e-3, 1e3))
        if not key.endswith("running_var"):
            tensors[key].flat[0] = np.nan
    elif kind == "integer":
        tensors[key] = tensors[key].astype(np.int32)
    else:  # a prefix on one key only is not a shared prefix: an unexpected key
        tensors[draw(st.sampled_from(["module.", "_orig_mod."])) + key] = tensors.pop(key)
    return f"{kind} {key!r}"


class _Case(NamedTuple):
    tensors: dict[str, np.ndarray]
    suffix: str
    defects: list[str]
    options: list[str]
    cut: float | None

    def __repr__(self) -> str:  # the arrays would make a 40 kB repr
        return f"_Case({self.suffix}, defects={self.defects}, {self.options}, cut={self.cut})"


@st.composite
def _damaged_checkpoints(draw: st.DrawFn) -> _Case:
    """A RepVGG state dict with 1-4 defects (each an error by construction), and CLI options."""
    model = _model(seed=draw(st.integers(0, 3)))
    if draw(st.booleans()):
        model = model.reparameterize()
    layout = draw(st.sampled_from(["official", "timm"]))
    tensors = {k: np.array(v) for k, v in to_state_dict(model, layout=layout).items()}  # type: ignore[arg-type]
    touched: set[str] = set()
    defects = [_defect(draw, tensors, touched) for _ in range(draw(st.integers(1, 4)))]
    options: list[str] = []
    if draw(st.booleans()):
        options += ["--layout", draw(st.sampled_from(["official", "timm"]))]
    if draw(st.booleans()):
        options += ["--arch", draw(st.sampled_from(["A0", "RepVGG-B1g4"]))]
    cut = draw(st.one_of(st.none(), st.floats(0.0, 0.99)))  # also a file cut short
    return _Case(tensors, draw(st.sampled_from([".npz", ".safetensors"])), defects, options, cut)


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("p")
    np.save(root / "x.npy", np.zeros((1, 1, 12, 12), np.float32))
    return root


@given(case=_damaged_checkpoints(), command=st.sampled_from(sorted(_COMMANDS)))
def test_every_cli_error_is_one_line_of_at_most_300_characters(
    scratch: Path, case: _Case, command: str
) -> None:
    for name in ("out.npz", "y.npy", "out.onnx"):
        (scratch / name).unlink(missing_ok=True)
    path = scratch / f"w{case.suffix}"
    write_tensors(path, case.tensors)
    if case.cut is not None:
        data = path.read_bytes()
        path.write_bytes(data[: int(len(data) * case.cut)])
    options = case.options
    if command == "info" and "--arch" in options:  # info takes any architecture
        at = options.index("--arch")
        options = options[:at] + options[at + 2 :]
    argv = [str(part) for part in _commands(path, scratch)[command]] + options
    args = _parser().parse_args(argv)
    sink = io.StringIO()
    with redirect_stderr(sink), redirect_stdout(sink), pytest.raises(ReparamError) as info:
        _dispatch(args)
    message = str(info.value)
    line = error_line(command, message)
    assert "\n" not in message, f"{case.defects}: not one line:\n{message}"
    assert len(line) <= MAX_LINE, f"{case.defects}: {len(line)} characters:\n{line}"
    written = [name for name in ("out.npz", "y.npy", "out.onnx") if (scratch / name).exists()]
    assert not written, f"{case.defects}: wrote {written}"
