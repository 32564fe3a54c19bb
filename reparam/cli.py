"""The ``reparam`` command line: convert, verify, run and inspect RepVGG checkpoints in NumPy.

Commands::

    reparam convert TRAIN DEPLOY [--layout official|timm] [--arch NAME]
    reparam verify WEIGHTS [--arch NAME] [--batch N] [--size S] [--seed K]
    reparam run WEIGHTS --input X.npy --output Y.npy [--arch NAME]
    reparam info WEIGHTS
    reparam export WEIGHTS MODEL.onnx [--arch NAME] [--opset N] [--layout official|timm]
    reparam demo [--checkpoint PATH] [--data PATH]

Exit codes: 0 success, 1 ``verify`` found the forms disagree, 2 any error
(one line on stderr saying what is wrong and what to do).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from .checkpoints.formats import CHECKPOINT_SUFFIXES, save_array
from .checkpoints.repvgg import load, save
from .core.errors import ReparamError
from .export.onnx import DEFAULT_OPSET, export_onnx
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


def _load(path: str, args: argparse.Namespace) -> RepVGG:
    _progress(f"loading {path} ...")
    return load(path, arch=getattr(args, "arch", None), layout=getattr(args, "layout", None))


def _check_output(path: str, allowed: tuple[str, ...]) -> None:
    """Fail before any work when the output format is unknown."""
    suffix = Path(path).suffix.lower()
    if suffix not in allowed:
        raise ReparamError(
            f"unknown file format {Path(path).name!r} for the output; got suffix "
            f"{suffix or '(none)'!r}, expected one of {', '.join(allowed)}"
        )


def _convert(args: argparse.Namespace) -> int:
    _check_output(args.deploy, CHECKPOINT_SUFFIXES)
    model = _load(args.train, args)
    if model.form == "deploy":
        raise ReparamError(
            f"convert: {args.train} is already in deploy form; expected a train-form "
            "checkpoint (nothing to fuse)"
        )
    _progress(f"fusing {len(model.blocks)} blocks ...")
    start = time.perf_counter()
    deploy = model.reparameterize()
    seconds = time.perf_counter() - start
    blocks = [block for _, block in model.blocks if isinstance(block, TrainBlock)]
    with_1x1 = sum(block.pointwise_kernel is not None for block in blocks)
    with_identity = sum(block.identity_bn is not None for block in blocks)
    save(deploy, args.deploy)
    _out(f"architecture: {model.arch or 'custom'} ({model.layout} layout, {model.dtype})")
    _out(
        f"fused {len(blocks)} blocks ({with_1x1} with a 1x1 branch, {with_identity} with an "
        f"identity branch) in {seconds:.3f} s"
    )
    _out(f"parameters: train {_millions(model.num_parameters)}")
    _out(f"            deploy {_millions(deploy.num_parameters)}")
    _out(f"wrote {args.deploy}")
    return 0


def _default_size(model: RepVGG) -> int:
    return 64 if model.arch is not None else 32


def _verify(args: argparse.Namespace) -> int:
    model = _load(args.weights, args)
    if model.form == "deploy":
        raise ReparamError(
            f"verify: {args.weights} is in deploy form; expected the train-form checkpoint "
            "(verify fuses it and compares both forms)"
        )
    size = args.size if args.size is not None else _default_size(model)
    rng = np.random.default_rng(args.seed)
    x = rng.standard_normal((args.batch, model.in_channels, size, size)).astype(model.dtype)
    _progress(f"fusing {len(model.blocks)} blocks ...")
    deploy = model.reparameterize()
    _progress(f"running both forms on a {x.shape} input ...")
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
    if relative > tolerance:
        _out("FAIL: the deploy form does not reproduce the train form")
        return 1
    _out("OK: both forms agree")
    return 0


def _run(args: argparse.Namespace) -> int:
    _check_output(args.output, (".npy",))
    model = _load(args.weights, args)
    if Path(args.input).suffix.lower() != ".npy":
        raise ReparamError(f"run: --input must be a single array in a .npy file; got {args.input}")
    x = np.load(args.input, allow_pickle=False)
    if x.ndim != 4:
        raise ReparamError(f"run: --input must be an NCHW array; got shape {x.shape}")
    _progress(f"running the {model.form} form on {x.shape} ...")
    logits = model(x)
    save_array(args.output, logits)
    _out(f"{model.form} form, {model.arch or 'custom'}: logits {logits.shape} -> {args.output}")
    return 0


def _info(args: argparse.Namespace) -> int:
    model = _load(args.weights, args)
    _out(f"layout:        {model.layout}")
    _out(f"form:          {model.form}")
    _out(f"architecture:  {model.arch or 'custom'}")
    _out(f"dtype:         {model.dtype}")
    _out(f"blocks:        {len(model.blocks)}")
    _out(f"input:         {model.in_channels} channels; classes: {model.num_classes}")
    _out(f"parameters:    {_millions(model.num_parameters)}")
    own = model.multiply_adds(224, 224)
    line = f"multiply-adds: {own / 1e9:.2f} G at 224x224 ({model.form} form)"
    if model.form == "train":
        deploy = model.multiply_adds(224, 224, form="deploy")
        line += f", {deploy / 1e9:.2f} G deploy form"
    _out(line)
    return 0


def _export(args: argparse.Namespace) -> int:
    _check_output(args.onnx, (".onnx",))
    model = _load(args.weights, args)
    _progress(f"building the ONNX graph ({len(model.blocks)} blocks) ...")
    export_onnx(model, args.onnx, opset=args.opset)
    converted = " (converted from the train form)" if model.form == "train" else ""
    _out(f"architecture: {model.arch or 'custom'} ({model.layout} layout)")
    _out(
        f"exported the deploy form{converted}: {len(model.blocks)} Conv+Relu, "
        f"GlobalAveragePool, Flatten, Gemm; opset {args.opset}, float32, dynamic batch and size"
    )
    _out(f"wrote {args.onnx}")
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


def _demo(args: argparse.Namespace) -> int:
    checkpoint = Path(args.checkpoint) if args.checkpoint else _embedded("digits_repvgg.npz")
    data_path = Path(args.data) if args.data else _embedded("digits_test.npz")
    for path in (checkpoint, data_path):
        if not path.is_file():
            raise ReparamError(
                f"demo: {path} is missing; reinstall reparam (pip install reparam) or pass "
                "--checkpoint and --data"
            )
    model = _load(str(checkpoint), args)
    with np.load(data_path, allow_pickle=False) as data:
        images: npt.NDArray[Any] = data["images"]
        labels: npt.NDArray[Any] = data["labels"]
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
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def arch(command: argparse.ArgumentParser) -> None:
        command.add_argument(
            "--arch", help="published architecture the weights must have (e.g. RepVGG-A0)"
        )

    convert = commands.add_parser("convert", help="fuse a train checkpoint into deploy weights")
    convert.add_argument("train", help="train-form checkpoint (.npz, .safetensors, .pth, .pt)")
    convert.add_argument("deploy", help="output file; its suffix chooses the format")
    convert.add_argument("--layout", choices=("official", "timm"), help="force the key layout")
    arch(convert)
    convert.set_defaults(handler=_convert)

    verify = commands.add_parser("verify", help="check that both forms give the same logits")
    verify.add_argument("weights", help="train-form checkpoint")
    arch(verify)
    verify.add_argument("--batch", type=int, default=2, help="images in the batch (default 2)")
    verify.add_argument(
        "--size", type=int, help="image side (default 64; 32 for custom architectures)"
    )
    verify.add_argument("--seed", type=int, default=0, help="seed of the random input")
    verify.set_defaults(handler=_verify)

    run = commands.add_parser("run", help="compute logits for an NCHW .npy input")
    run.add_argument("weights", help="checkpoint, train or deploy form")
    run.add_argument("--input", required=True, help="NCHW array (.npy)")
    run.add_argument("--output", required=True, help="where to write the logits (.npy)")
    arch(run)
    run.set_defaults(handler=_run)

    info = commands.add_parser("info", help="describe a checkpoint")
    info.add_argument("weights", help="checkpoint, train or deploy form")
    info.set_defaults(handler=_info)

    export = commands.add_parser("export", help="write the deploy form as an ONNX model")
    export.add_argument("weights", help="checkpoint, train or deploy form")
    export.add_argument("onnx", help="output .onnx file")
    export.add_argument(
        "--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset (default {DEFAULT_OPSET})"
    )
    export.add_argument("--layout", choices=("official", "timm"), help="force the key layout")
    arch(export)
    export.set_defaults(handler=_export)

    demo = commands.add_parser("demo", help="convert the bundled digits model and compare forms")
    demo.add_argument("--checkpoint", help="train-form checkpoint (default: the bundled one)")
    demo.add_argument("--data", help="test set .npz with images and labels (default: bundled)")
    demo.set_defaults(handler=_demo)
    return parser


def _positive(args: argparse.Namespace) -> None:
    for name in ("batch", "size"):
        value = getattr(args, name, None)
        if value is not None and value < 1:
            raise ReparamError(f"{args.command}: --{name} must be >= 1; got {value}")


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
        error (reported as one line on stderr).
    """
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse reports usage errors itself (exit 2)
        return exc.code if isinstance(exc.code, int) else 2
    try:
        _positive(args)
        handler: Callable[[argparse.Namespace], int] = args.handler
        return handler(args)
    except ReparamError as exc:
        head, *rest = [line.strip() for line in str(exc).splitlines()] or [""]
        message = f"{head} {'; '.join(rest)}" if head.endswith(":") else "; ".join([head, *rest])
        sys.stderr.write(f"reparam {args.command}: error: {message}\n")
    except OSError as exc:
        where = f" {exc.filename}" if exc.filename else ""
        reason = exc.strerror or str(exc)
        sys.stderr.write(
            f"reparam {args.command}: error: cannot access{where}: {reason}; "
            "check the path and permissions\n"
        )
    return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
