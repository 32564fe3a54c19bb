"""The ``reparam`` command line: convert, verify, run and inspect RepVGG checkpoints in NumPy.

Commands::

    reparam convert TRAIN DEPLOY [--layout L] [--to-layout L] [--arch NAME] [--overwrite-input]
    reparam verify WEIGHTS [--layout L] [--arch NAME] [--batch N] [--size S] [--seed K]
    reparam run WEIGHTS --input X.npy --output Y.npy [--layout L] [--arch NAME]
    reparam info WEIGHTS [--layout L]
    reparam export WEIGHTS MODEL.onnx [--layout L] [--arch NAME] [--opset N]
    reparam demo [--checkpoint PATH] [--data PATH]
    reparam quant-report WEIGHTS --calibration X.npy [--per-channel] [--json FILE] [--png FILE]

``--layout`` says how the input's keys are read (detected by default);
``--to-layout`` names the keys ``convert`` writes (the input's by default).

Exit codes: 0 success, 1 ``verify`` found the forms disagree, 2 any error
(one line on stderr naming the file and, where one is at fault, the tensor),
130 interrupted (Ctrl-C), 141 stdout closed early (a broken pipe).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from . import __version__
from .analysis import load_network, quant
from .checkpoints.formats import (
    CHECKPOINT_SUFFIXES,
    check_destination,
    listing,
    read_array,
    read_checkpoint,
    save_array,
    shown,
    shown_path,
    write_tensors,
)
from .checkpoints.layouts import LAYOUTS
from .checkpoints.reader import Checkpoint, describe_stored, read_any
from .checkpoints.repvgg import save
from .checkpoints.walker import (
    FoundBlock,
    Overrides,
    convert_state_dict,
    find_blocks,
    parse_override,
)
from .core.errors import ReparamError
from .export.onnx import DEFAULT_OPSET, check_opset, export_onnx
from .models.repvgg import RepVGG, TrainBlock

__all__ = ["main"]

#: Largest allowed ``max |train - deploy| / max |logit|`` per dtype for ``verify``.
VERIFY_TOLERANCE = {np.dtype(np.float32): 2e-5, np.dtype(np.float64): 1e-10}


def _out(text: str) -> None:
    sys.stdout.write(text + "\n")


def _progress(text: str) -> None:
    sys.stderr.write(text + "\n")
    sys.stderr.flush()


def _millions(count: int) -> str:
    return f"{count:,} ({count / 1e6:.2f} M)"


@contextlib.contextmanager
def _file_errors(path: str | os.PathLike[str], verb: str) -> Iterator[None]:
    """Report an ``OSError`` while reading or writing ``path`` as one line naming the file."""
    try:
        yield
    except BrokenPipeError:
        raise
    except OSError as exc:
        name = shown_path(exc.filename if exc.filename is not None else path)
        reason = exc.strerror or str(exc)
        hint = "; check the path and permissions" if verb == "read" else ""
        raise ReparamError(f"cannot {verb} {name}: {reason}{hint}") from exc


def _overrides(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Per-prefix options from ``--overrides FILE`` (JSON or TOML), then every ``--set``."""
    result: dict[str, dict[str, Any]] = {}
    path = getattr(args, "overrides", None)
    if path:
        with _file_errors(path, "read"):
            result = read_overrides(path)
    for text in getattr(args, "set", None) or []:
        prefix, option, value = parse_override(text)
        result.setdefault(prefix, {})[option] = value
    return result


def read_overrides(path: str) -> dict[str, dict[str, Any]]:
    """Read ``{"PREFIX": {"option": value}}`` from a .json or .toml file."""
    name = shown_path(path)
    suffix = Path(path).suffix.lower()
    with open(path, "rb") as stream:
        raw = stream.read()
    try:
        if suffix == ".json":
            data = json.loads(raw)
        elif suffix == ".toml":
            try:
                import tomllib
            except ImportError:  # Python 3.10
                raise ReparamError(
                    f"--overrides: reading {name} needs Python 3.11's tomllib; hint: use JSON"
                ) from None
            data = tomllib.loads(raw.decode())
        else:
            raise ReparamError(f"--overrides: {name} must be .json or .toml; got {suffix!r}")
    except ReparamError:
        raise
    except (ValueError, UnicodeDecodeError) as exc:
        raise ReparamError(f"--overrides: cannot parse {name} ({shown(exc, 80)})") from None
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise ReparamError(
            f"--overrides: {name} must map block prefixes to option tables, e.g. "
            '{"backbone.*": {"stride": 1}}'
        )
    return {str(prefix): dict(options) for prefix, options in data.items()}


def _strides(overrides: Overrides) -> dict[str, int]:
    return {prefix: int(o["stride"]) for prefix, o in overrides.items() if "stride" in o}


def _read(path: str, args: argparse.Namespace, *, network_only: bool = False) -> Checkpoint:
    _progress(f"loading {path} ...")
    with _file_errors(path, "read"):
        return read_any(
            path,
            layout=getattr(args, "layout", None),
            arch=getattr(args, "arch", None),
            eps=getattr(args, "eps", 1e-5),
            strides=_strides(_overrides(args)),
            network_only=network_only,
        )


def _network(path: str, args: argparse.Namespace) -> RepVGG:
    checkpoint = _read(path, args, network_only=True)
    assert checkpoint.network is not None  # network_only refuses anything else
    return checkpoint.network


def _same_file(source: str, destination: str) -> bool:
    """Whether two paths name one file (the same path, a symlink or a hard link)."""
    try:
        return os.path.samefile(source, destination)
    except OSError:  # one of them does not exist (yet)
        return False


def _convert(args: argparse.Namespace) -> int:
    check_destination(args.deploy, func="convert", allowed=CHECKPOINT_SUFFIXES)
    if not args.overwrite_input and _same_file(args.train, args.deploy):
        raise ReparamError(
            f"convert: the output {shown_path(args.deploy)} is the input file; writing it would "
            "replace the train weights with the deploy form; hint: choose another output, or "
            "pass --overwrite-input"
        )
    checkpoint = _read(args.train, args)
    if checkpoint.network is None:
        return _convert_blocks(checkpoint, args)
    model = checkpoint.network
    if model.form == "deploy":
        raise ReparamError(
            f"convert: {shown_path(args.train)} is already in deploy form; expected a train-form "
            "checkpoint (nothing to fuse)"
        )
    _progress(f"fusing {len(model.blocks)} blocks ...")
    start = time.perf_counter()
    deploy = model.reparameterize()
    seconds = time.perf_counter() - start
    blocks = [block for _, block in model.blocks if isinstance(block, TrainBlock)]
    with_1x1 = sum(block.pointwise_kernel is not None for block in blocks)
    with_identity = sum(block.identity_bn is not None for block in blocks)
    layout = args.to_layout or model.layout
    with _file_errors(args.deploy, "write"):
        save(deploy, args.deploy, layout=layout)
    _out(f"architecture: {model.arch or 'custom'} ({model.layout} layout, {model.dtype})")
    _out(
        f"fused {len(blocks)} blocks ({with_1x1} with a 1x1 branch, {with_identity} with an "
        f"identity branch) in {seconds:.3f} s"
    )
    _out(f"parameters: train {_millions(model.num_parameters)}")
    _out(f"            deploy {_millions(deploy.num_parameters)}")
    _out(f"wrote {args.deploy} ({layout} layout)")
    return 0


def _convert_blocks(checkpoint: Checkpoint, args: argparse.Namespace) -> int:
    """Fuse every block of every family found; copy every other tensor through."""
    if args.to_layout is not None:
        raise ReparamError(
            "convert: --to-layout renames a whole RepVGG network; this checkpoint is not one "
            "(its blocks keep their own key names)"
        )
    _progress("finding and fusing blocks ...")
    start = time.perf_counter()
    deploy, report = convert_state_dict(
        checkpoint.tensors, overrides=_overrides(args), eps=args.eps
    )
    seconds = time.perf_counter() - start
    with _file_errors(args.deploy, "write"):
        write_tensors(args.deploy, deploy)
    for line in report.lines():
        _out(line)
    _out(f"fused in {seconds:.3f} s")
    _out(f"wrote {args.deploy} (each block under its deploy module's key names)")
    return 0


def _default_size(model: RepVGG) -> int:
    return 64 if model.arch is not None else 32


def _verify(args: argparse.Namespace) -> int:
    checkpoint = _read(args.weights, args)
    if checkpoint.network is None:
        return _verify_blocks(checkpoint, args)
    model = checkpoint.network
    if model.form == "deploy":
        raise ReparamError(
            f"verify: {shown_path(args.weights)} is in deploy form; expected the train-form "
            "checkpoint (verify fuses it and compares both forms)"
        )
    size = args.size if args.size is not None else _default_size(model)
    rng = np.random.default_rng(args.seed)
    x = rng.standard_normal((args.batch, model.in_channels, size, size)).astype(model.dtype)
    _progress(f"fusing {len(model.blocks)} blocks ...")
    deploy = model.reparameterize()
    _progress(f"running both forms on a {x.shape} input ...")
    with np.errstate(over="ignore", invalid="ignore"):  # non-finite logits are reported below
        train_logits = model(x)
        deploy_logits = deploy(x)
        difference = float(np.max(np.abs(train_logits - deploy_logits)))
        magnitude = float(np.max(np.abs(train_logits)))
        relative = difference / magnitude if magnitude > 0 else difference
    agree = float(np.mean(train_logits.argmax(axis=1) == deploy_logits.argmax(axis=1)))
    tolerance = VERIFY_TOLERANCE[model.dtype]
    _out(f"architecture: {model.arch or 'custom'} ({model.layout} layout, {model.dtype})")
    _out(f"input: batch {args.batch}, {size}x{size}, seed {args.seed}")
    _out(f"max |train - deploy| = {difference:.3e} (max |logit| {magnitude:.3g})")
    _out(f"relative difference  = {relative:.3e} (tolerance {tolerance:g})")
    _out(f"top-1 agreement      = {agree:.0%}")
    finite = bool(np.isfinite(train_logits).all() and np.isfinite(deploy_logits).all())
    if not finite:
        _out("FAIL: the logits are not finite (NaN or inf), so the forms cannot be compared")
        return 1
    if relative > tolerance:
        _out("FAIL: the deploy form does not reproduce the train form")
        return 1
    _out("OK: both forms agree")
    return 0


def _verify_blocks(checkpoint: Checkpoint, args: argparse.Namespace) -> int:
    """Check every block found: its fused conv against its train form on a random input."""
    blocks, _ = find_blocks(checkpoint.tensors, overrides=_overrides(args), eps=args.eps)
    if not blocks:
        raise ReparamError(
            f"verify: {shown_path(args.weights)} holds no train-form block of a registered family"
        )
    rng = np.random.default_rng(args.seed)
    worst: tuple[float, FoundBlock] | None = None
    failed = []
    for found in blocks:
        relative = _block_difference(found, rng, args)
        tolerance = VERIFY_TOLERANCE.get(found.block.reparameterize().kernel.dtype, 1e-2)
        if not relative <= tolerance:  # NaN fails too
            failed.append(f"{found.name} ({found.family}): {relative:.3e}")
        if worst is None or not relative <= worst[0]:
            worst = (relative, found)
    assert worst is not None
    _out(f"blocks checked: {len(blocks)} (batch {args.batch}, seed {args.seed})")
    _out(f"worst relative difference: {worst[0]:.3e} at {worst[1].name} ({worst[1].family})")
    if failed:
        _out(f"FAIL: {len(failed)} blocks differ: {listing(failed, budget=200)}")
        return 1
    _out("OK: every fused block reproduces its train form")
    return 0


def _block_difference(
    found: FoundBlock, rng: np.random.Generator, args: argparse.Namespace
) -> float:
    """``max |train - fused| / max magnitude`` of one block on a random NCHW input."""
    conv = found.block.reparameterize()
    size = args.size if args.size is not None else max(16, conv.kernel.shape[2] + 4)
    shape = (args.batch, conv.in_channels, size, size)
    x = rng.standard_normal(shape).astype(np.promote_types(conv.kernel.dtype, np.float32))
    with np.errstate(over="ignore", invalid="ignore"):
        difference = float(np.max(np.abs(found.block(x) - conv(x))))
        magnitude = float(np.max(found.block.magnitude(x)))
    return difference / magnitude if magnitude > 0 else difference


def _run(args: argparse.Namespace) -> int:
    check_destination(args.output, func="run", allowed=(".npy",), what="--output")
    if _same_file(args.input, args.output):
        raise ReparamError(
            f"run: the --output {shown_path(args.output)} is the --input file; writing the "
            "logits would replace the images; hint: choose another output"
        )
    with _file_errors(args.input, "read"):
        x = read_array(args.input, func="run")
    name = shown_path(args.input)
    if x.ndim != 4:
        raise ReparamError(f"run: --input {name} must be an NCHW array; got shape {x.shape}")
    if np.issubdtype(x.dtype, np.floating):
        bad = int(np.count_nonzero(~np.isfinite(x)))
        if bad:
            raise ReparamError(
                f"run: --input {name} has {bad:,} non-finite values (NaN or inf) of {x.size:,}"
            )
    model = _network(args.weights, args)
    _progress(f"running the {model.form} form on {x.shape} ...")
    with np.errstate(over="ignore", invalid="ignore"):
        logits = model(x)
    bad = int(np.count_nonzero(~np.isfinite(logits)))
    if bad:
        raise ReparamError(
            f"run: {bad:,} of the {logits.size:,} logits are not finite (NaN or inf); the "
            f"weights overflow {model.dtype} on this input; nothing was written"
        )
    with _file_errors(args.output, "write"):
        save_array(args.output, logits)
    _out(f"{model.form} form, {model.arch or 'custom'}: logits {logits.shape} -> {args.output}")
    return 0


def _info(args: argparse.Namespace) -> int:
    checkpoint = _read(args.weights, args)
    model = checkpoint.network
    if model is not None:
        _out(f"layout:        {model.layout}")
        _out(f"form:          {model.form}")
        _out(f"architecture:  {model.arch or 'custom'}")
        _out(f"dtype:         {model.dtype}{describe_stored(checkpoint, model.dtype)}")
        _out(f"blocks:        {len(model.blocks)}")
        _out(f"strides:       {_describe_strides(model)}")
        _out(f"input:         {model.in_channels} channels; classes: {model.num_classes}")
        _out(f"parameters:    {_millions(model.num_parameters)}")
        own = model.multiply_adds(224, 224)
        line = f"multiply-adds: {own / 1e9:.2f} G at 224x224 ({model.form} form)"
        if model.form == "train":
            deploy = model.multiply_adds(224, 224, form="deploy")
            line += f", {deploy / 1e9:.2f} G deploy form"
        _out(line)
        if model.form == "deploy":
            return 0
    else:
        stored = ", ".join(checkpoint.stored_dtypes) or "no floating tensors"
        _out(f"tensors:       {len(checkpoint.tensors)} ({stored})")
    _, report = convert_state_dict(checkpoint.tensors, overrides=_overrides(args), eps=args.eps)
    for line in report.lines():
        _out(line)
    return 0


def _describe_strides(model: RepVGG) -> str:
    twos = [name for name, spec in model.specs if spec.stride == 2]
    shown_twos = ", ".join(twos[:6]) + (", ..." if len(twos) > 6 else "")
    return (
        f"2 at {shown_twos or 'no block'}; 1 elsewhere (an identity branch means 1; otherwise "
        "the RepVGG rule, 2 at a stage's first block; --set PREFIX.stride=S states one)"
    )


def _export(args: argparse.Namespace) -> int:
    check_destination(args.onnx, func="export", allowed=(".onnx",))
    check_opset(args.opset, func="export")
    model = _network(args.weights, args)
    _progress(f"building the ONNX graph ({len(model.blocks)} blocks) ...")
    with _file_errors(args.onnx, "write"):
        export_onnx(model, args.onnx, opset=args.opset)
    converted = " (converted from the train form)" if model.form == "train" else ""
    _out(f"architecture: {model.arch or 'custom'} ({model.layout} layout)")
    _out(
        f"exported the deploy form{converted}: {len(model.blocks)} Conv+Relu, "
        f"GlobalAveragePool, Flatten, Gemm; opset {args.opset}, float32, dynamic batch and size"
    )
    _out(f"wrote {args.onnx}")
    return 0


def _quant_report(args: argparse.Namespace) -> int:
    func = "quant-report"
    for path, suffix in ((args.json, ".json"), (args.png, ".png")):
        if path is not None:
            check_destination(path, func=func, allowed=(suffix,), what=f"--{suffix[1:]}")
    if args.png is not None:
        quant.check_plotting(func=func)
    with _file_errors(args.calibration, "read"):
        calibration = read_array(args.calibration, func=func)
    _progress(f"loading {args.weights} ...")
    with _file_errors(args.weights, "read"):
        network = load_network(args.weights, layout=args.layout, arch=args.arch)
    name = f"--calibration {shown_path(args.calibration)}"
    images = quant.check_images(calibration, network.model, func=func, name=name)
    _progress(f"quantizing {len(network.model.blocks)} blocks on {len(images)} images ...")
    found = quant.report(network, images, per_channel=args.per_channel)
    _out(found.table())
    for path, write in ((args.json, quant.write_json), (args.png, quant.plot_report)):
        if path is not None:
            with _file_errors(path, "write"):
                write(found, path)
            _out(f"wrote {path}")
    return 0


def _median_seconds(function: Callable[[], Any], repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _embedded(name: str) -> Path:
    return Path(str(resources.files("reparam").joinpath("data", name)))


def _read_digits(path: Path) -> tuple[npt.NDArray[Any], npt.NDArray[Any]]:
    """Images (N, C, H, W) and integer labels (N,) from an ``.npz``, checked before use."""
    name = shown_path(path)
    expected = "expected an .npz with images (N, C, H, W) and labels (N,)"
    if path.suffix.lower() != ".npz":
        raise ReparamError(f"demo: --data {name} is not an .npz file; {expected}")

    def both_present(keys: list[str]) -> None:
        missing = [key for key in ("images", "labels") if key not in keys]
        if missing:
            raise ReparamError(f"demo: {name} has no {' or '.join(missing)} array; {expected}")

    with _file_errors(path, "read"):
        arrays = read_checkpoint(path, check_keys=both_present).tensors
    images, labels = arrays["images"], arrays["labels"]
    if images.ndim != 4 or not np.issubdtype(images.dtype, np.floating):
        raise ReparamError(
            f"demo: {name}: images has shape {shown(images.shape, 30)} and dtype {images.dtype}; "
            "expected floating images (N, C, H, W)"
        )
    if labels.shape != images.shape[:1] or not np.issubdtype(labels.dtype, np.integer):
        raise ReparamError(
            f"demo: {name}: labels has shape {shown(labels.shape, 30)} and dtype {labels.dtype}; "
            f"expected integers of shape ({images.shape[0]},), one per image"
        )
    return images, labels


def _demo(args: argparse.Namespace) -> int:
    paths = []
    for given, bundled in ((args.checkpoint, "digits_repvgg.npz"), (args.data, "digits_test.npz")):
        path = Path(given) if given else _embedded(bundled)
        if not given and not path.is_file():
            raise ReparamError(
                f"demo: the bundled {bundled} is missing; reinstall reparam (pip install reparam) "
                "or pass --checkpoint and --data"
            )
        paths.append(path)
    checkpoint, data_path = paths
    images, labels = _read_digits(data_path)
    model = _network(str(checkpoint), args)
    _progress(f"fusing {len(model.blocks)} blocks ...")
    deploy = model.reparameterize()
    _progress(f"classifying {len(labels)} held-out digits with both forms ...")
    train_logits = model(images)
    deploy_logits = deploy(images)
    train_pred = train_logits.argmax(axis=1)
    deploy_pred = deploy_logits.argmax(axis=1)
    same = int(np.sum(train_pred == deploy_pred))
    difference = float(np.max(np.abs(train_logits - deploy_logits)))
    train_time = _median_seconds(lambda: model(images))
    deploy_time = _median_seconds(lambda: deploy(images))
    _out(
        f"RepVGG digits classifier ({len(model.blocks)} blocks, {model.dtype}), "
        f"{len(labels)} held-out {images.shape[2]}x{images.shape[3]} digits"
    )
    _out(f"{'':8}{'accuracy':>10}{'parameters':>12}{'forward (median of 5)':>24}")
    for name, logits, form, seconds in (
        ("train", train_logits, model, train_time),
        ("deploy", deploy_logits, deploy, deploy_time),
    ):
        accuracy = float(np.mean(logits.argmax(axis=1) == labels))
        _out(f"{name:8}{accuracy:>10.2%}{form.num_parameters:>12,}{seconds * 1e3:>21.1f} ms")
    _out(f"identical predictions: {same}/{len(labels)}")
    _out(f"max |train - deploy| logit difference: {difference:.2e}")
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="reparam",
        description="Convert, verify and run RepVGG checkpoints in pure NumPy.",
    )
    parser.add_argument("--version", action="version", version=f"reparam {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def arch(command: argparse.ArgumentParser) -> None:
        command.add_argument(
            "--arch", help="published architecture the weights must have (e.g. RepVGG-A0)"
        )

    def layout(command: argparse.ArgumentParser) -> None:
        command.add_argument(
            "--layout",
            choices=LAYOUTS,
            help="key layout of the input (default: detected from the keys)",
        )

    def options(command: argparse.ArgumentParser) -> None:
        command.add_argument(
            "--set",
            action="append",
            metavar="PREFIX.OPTION=VALUE",
            help="state what the tensors cannot say, per block prefix (fnmatch patterns), e.g. "
            "'backbone.*.stride=1', 'neck.0.family=QARepVGGBlockV2', '*.eps=0.001'; repeatable",
        )
        command.add_argument(
            "--overrides",
            metavar="FILE",
            help='the same as a .json or .toml file: {"PREFIX": {"option": value}}',
        )
        command.add_argument(
            "--eps",
            type=float,
            default=1e-5,
            help="BatchNorm epsilon of every block (default 1e-5; YOLOv6 models use 1e-3)",
        )

    convert = commands.add_parser("convert", help="fuse a train checkpoint into deploy weights")
    convert.add_argument("train", help="train-form checkpoint (.npz, .safetensors, .pth, .pt)")
    convert.add_argument(
        "deploy", help="output file; its suffix chooses the format (replaced atomically)"
    )
    layout(convert)
    convert.add_argument(
        "--to-layout",
        choices=LAYOUTS,
        help="key layout to write (default: the input's)",
    )
    arch(convert)
    convert.add_argument(
        "--overwrite-input",
        action="store_true",
        help="allow the output to be the input file itself (the train weights are lost)",
    )
    options(convert)
    convert.set_defaults(handler=_convert)

    verify = commands.add_parser("verify", help="check that both forms give the same logits")
    verify.add_argument("weights", help="train-form checkpoint")
    layout(verify)
    arch(verify)
    verify.add_argument("--batch", type=int, default=2, help="images in the batch (default 2)")
    verify.add_argument(
        "--size", type=int, help="image side (default 64; 32 for custom architectures)"
    )
    verify.add_argument("--seed", type=int, default=0, help="seed of the random input")
    options(verify)
    verify.set_defaults(handler=_verify)

    run = commands.add_parser("run", help="compute logits for an NCHW .npy input")
    run.add_argument("weights", help="checkpoint, train or deploy form")
    run.add_argument("--input", required=True, help="NCHW array (.npy)")
    run.add_argument("--output", required=True, help="where to write the logits (.npy)")
    layout(run)
    arch(run)
    options(run)
    run.set_defaults(handler=_run)

    info = commands.add_parser("info", help="describe a checkpoint")
    info.add_argument("weights", help="checkpoint, train or deploy form")
    layout(info)
    options(info)
    info.set_defaults(handler=_info)

    export = commands.add_parser("export", help="write the deploy form as an ONNX model")
    export.add_argument("weights", help="checkpoint, train or deploy form")
    export.add_argument("onnx", help="output .onnx file")
    export.add_argument(
        "--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset (default {DEFAULT_OPSET})"
    )
    layout(export)
    arch(export)
    options(export)
    export.set_defaults(handler=_export)

    demo = commands.add_parser("demo", help="convert the bundled digits model and compare forms")
    demo.add_argument("--checkpoint", help="train-form checkpoint (default: the bundled one)")
    demo.add_argument("--data", help="test set .npz with images and labels (default: bundled)")
    demo.set_defaults(handler=_demo)

    report = commands.add_parser("quant-report", help="which fused layers INT8 breaks, and why")
    report.add_argument("weights", help="RepVGG (train or deploy form) or QARepVGG checkpoint")
    report.add_argument("--calibration", required=True, help="NCHW float images (.npy), >= 8")
    report.add_argument("--per-channel", action="store_true", help="per-channel weight scales")
    report.add_argument("--json", help="also write the report as JSON")
    report.add_argument("--png", help="also draw the per-layer SQNRs (needs matplotlib)")
    layout(report)
    arch(report)
    report.set_defaults(handler=_quant_report)
    return parser


def _positive(args: argparse.Namespace) -> None:
    for name in ("batch", "size"):
        value = getattr(args, name, None)
        if value is not None and value < 1:
            raise ReparamError(f"{args.command}: --{name} must be >= 1; got {value}")


def error_line(command: str, message: str) -> str:
    """Render an error as the one line ``main`` prints: control characters escaped.

    Parameters
    ----------
    command : str
        The command that failed, e.g. ``"convert"``.
    message : str
        The error's text.

    Returns
    -------
    str
        ``"reparam COMMAND: error: MESSAGE"``, without a newline.
    """
    return f"reparam {command}: error: {shown(message.strip(), limit=10**6)}"


def _quiet_stdout() -> None:
    """Point stdout at /dev/null, so that the final flush at exit cannot fail again."""
    with contextlib.suppress(OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())


def _dispatch(args: argparse.Namespace) -> int:
    """Run the chosen command; errors propagate (``main`` turns them into exit codes)."""
    _positive(args)
    handler: Callable[[argparse.Namespace], int] = args.handler
    code = handler(args)
    sys.stdout.flush()  # a closed pipe shows up here, not at exit
    return code


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``reparam`` command line; return the exit code.

    Parameters
    ----------
    argv : sequence of str, optional
        Arguments without the program name; ``sys.argv[1:]`` by default.

    Returns
    -------
    int
        0 on success, 1 when ``verify`` finds the forms disagree, 2 on any
        error (reported as one line on stderr), 130 when interrupted
        (Ctrl-C), 141 when stdout is closed early (``reparam info X | head``).
    """
    try:
        parser = _parser()
        try:
            args = parser.parse_args(argv)
        except SystemExit as exc:  # argparse reports usage errors itself (exit 2)
            sys.stdout.flush()
            return exc.code if isinstance(exc.code, int) else 2
        try:
            return _dispatch(args)
        except ReparamError as exc:
            message = str(exc)
        except BrokenPipeError:
            raise
        except OSError as exc:  # every path the commands touch is wrapped; this is a safety net
            where = f" {shown_path(exc.filename)}" if exc.filename is not None else ""
            message = f"cannot access{where}: {exc.strerror or exc}"
        sys.stderr.write(error_line(args.command, message) + "\n")
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        _quiet_stdout()
        return 141


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
