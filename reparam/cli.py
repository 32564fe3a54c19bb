"""The ``reparam`` command line: convert, verify, run and inspect checkpoints and ONNX graphs.

Commands::

    reparam convert TRAIN DEPLOY [--layout L] [--to-layout L] [--arch NAME] [--overwrite-input]
    reparam convert TRAIN.onnx DEPLOY.onnx [--max-cost-ratio R] [--overwrite-input]
    reparam verify WEIGHTS [--layout L] [--arch NAME] [--batch N] [--size S] [--seed K]
    reparam verify TRAIN.onnx [DEPLOY.onnx] [--shape N,C,H,W] [--seed K] [--max-cost-ratio R]
    reparam run WEIGHTS --input X.npy --output Y.npy [--layout L] [--arch NAME]
    reparam info WEIGHTS [--layout L]
    reparam info MODEL.onnx [--max-cost-ratio R]
    reparam export WEIGHTS MODEL.onnx [--layout L] [--arch NAME] [--opset N]
    reparam demo [--checkpoint PATH] [--data PATH]
    reparam quant-report WEIGHTS --calibration X.npy [--per-channel] [--json FILE] [--png FILE]
                         [--progress]

``--layout`` says how the input's keys are read (detected by default);
``--to-layout`` names the keys ``convert`` writes (the input's by default).

A file is read into one of three kinds: a RepVGG network, blocks of any
checkpoint (found by :mod:`reparam.checkpoints.walker`), or an ONNX graph
(``.onnx``, folded by :mod:`reparam.graph`). Each command looks up its action
for the kind in one table, :data:`_ACTIONS`.

Exit codes: 0 success, 1 ``verify`` found the forms disagree, 2 any error
(one line on stderr naming the file and, where one is at fault, the tensor),
130 interrupted (Ctrl-C), 141 stdout closed early (a broken pipe).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from importlib import resources
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt

from . import __version__
from .analysis import quant
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
from .checkpoints.repvgg import load, save
from .checkpoints.walker import (
    FoundBlock,
    Overrides,
    convert_state_dict,
    find_blocks,
    parse_override,
)
from .core.errors import ReparamError
from .export.onnx import DEFAULT_OPSET, check_opset, export_onnx
from .graph import (
    FoldReport,
    Graph,
    fold_graph,
    fold_onnx,
    read_graph,
    save_onnx,
    write_graph,
)
from .graph.onnx import OnnxSource
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
            eps=1e-5 if getattr(args, "eps", None) is None else args.eps,
            strides=_strides(_overrides(args)),
            network_only=network_only,
        )


def _network(path: str, args: argparse.Namespace) -> RepVGG:
    checkpoint = _read(path, args, network_only=True)
    assert checkpoint.network is not None  # network_only refuses anything else
    return checkpoint.network


# --------------------------------------------------------------------------- kinds and actions


class _Input(NamedTuple):
    """The file a command was given, read into one of the kinds of :data:`_ACTIONS`.

    Attributes
    ----------
    kind : str
        ``"network"`` (a whole RepVGG), ``"blocks"`` (blocks of any checkpoint)
        or ``"graph"`` (an ONNX model).
    path : str
    checkpoint : Checkpoint or None
        The checkpoint as read, when reading it was needed to tell its kind;
        a graph, and a network for the commands that take nothing else, are
        read by their actions (after those check their outputs).
    """

    kind: str
    path: str
    checkpoint: Checkpoint | None = None


Action = Callable[[_Input, argparse.Namespace], int]


def _read_checkpoint(path: str, args: argparse.Namespace, *, network_only: bool) -> _Input:
    if network_only:
        return _Input("network", path)
    checkpoint = _read(path, args)
    return _Input("network" if checkpoint.network is not None else "blocks", path, checkpoint)


def _read_graph_file(path: str, args: argparse.Namespace, *, network_only: bool) -> _Input:
    return _Input("graph", path)


class _Format(NamedTuple):
    """How a file is read into a kind, and what ``convert`` writes from it."""

    read: Callable[..., _Input]
    writes: tuple[str, ...]


#: Readers by input suffix; any other suffix is a checkpoint (whose reader names the formats).
_FORMATS = {".onnx": _Format(_read_graph_file, (".onnx",))}
_CHECKPOINT = _Format(_read_checkpoint, CHECKPOINT_SUFFIXES)


def _format(path: str) -> _Format:
    return _FORMATS.get(Path(path).suffix.lower(), _CHECKPOINT)


def _open(path: str, args: argparse.Namespace, *, network_only: bool = False) -> _Input:
    """Read ``path`` into its kind (``network_only``: the command takes nothing but a network)."""
    return _format(path).read(path, args, network_only=network_only)


def _act(source: _Input, args: argparse.Namespace) -> int:
    """Run the command's action for the kind of ``source`` (from :data:`_ACTIONS`).

    Options that only the other kinds read are refused first (``--layout`` for a graph,
    ``--max-cost-ratio`` for a checkpoint).
    """
    action = _ACTIONS[args.command].get(source.kind)
    if action is None:  # pragma: no cover - each command reads only kinds it has actions for
        raise ReparamError(f"{args.command}: {shown_path(source.path)} is not a {source.kind}")
    foreign = _FOREIGN_OPTIONS[source.kind]
    given = [flag for attribute, flag in foreign.items() if getattr(args, attribute, None)]
    if given:
        raise ReparamError(
            f"{args.command}: {', '.join(given)} does not apply to {shown_path(source.path)}, "
            f"which is {_KIND_NAMES[source.kind]}"
        )
    return action(source, args)


def _instead(text: str) -> Action:
    """Return an action that refuses a graph; ``text`` says what to use instead."""

    def refuse(source: _Input, args: argparse.Namespace) -> int:
        name = shown_path(source.path)
        raise ReparamError(f"{args.command}: {name} is an ONNX graph; {text.format(path=name)}")

    return refuse


#: Options only checkpoints read, and only graphs read: ``{attribute: flag}``.
_CHECKPOINT_OPTIONS = {
    "layout": "--layout",
    "to_layout": "--to-layout",
    "arch": "--arch",
    "set": "--set",
    "overrides": "--overrides",
    "batch": "--batch",
    "size": "--size",
}
_GRAPH_OPTIONS = {
    "max_cost_ratio": "--max-cost-ratio",
    "shape": "--shape",
    "deploy_graph": "DEPLOY",
}
#: Per kind, the options of other kinds (refused), and how messages name the kind.
_FOREIGN_OPTIONS = {
    "network": _GRAPH_OPTIONS,
    "blocks": _GRAPH_OPTIONS,
    "graph": _CHECKPOINT_OPTIONS,
}
_KIND_NAMES = {"network": "a checkpoint", "blocks": "a checkpoint", "graph": "an ONNX graph"}


def _same_file(source: str, destination: str) -> bool:
    """Whether two paths name one file (the same path, a symlink or a hard link)."""
    try:
        return os.path.samefile(source, destination)
    except OSError:  # one of them does not exist (yet)
        return False


def _convert(args: argparse.Namespace) -> int:
    check_destination(args.deploy, func="convert", allowed=_format(args.train).writes)
    if not args.overwrite_input and _same_file(args.train, args.deploy):
        raise ReparamError(
            f"convert: the output {shown_path(args.deploy)} is the input file; writing it would "
            "replace the train weights with the deploy form; hint: choose another output, or "
            "pass --overwrite-input"
        )
    return _act(_open(args.train, args), args)


def _convert_network(source: _Input, args: argparse.Namespace) -> int:
    assert source.checkpoint is not None and source.checkpoint.network is not None
    model = source.checkpoint.network
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


def _convert_blocks(source: _Input, args: argparse.Namespace) -> int:
    """Fuse every block of every family found; copy every other tensor through."""
    checkpoint = source.checkpoint
    assert checkpoint is not None
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
    return _act(_open(args.weights, args), args)


def _verify_network(source: _Input, args: argparse.Namespace) -> int:
    assert source.checkpoint is not None and source.checkpoint.network is not None
    model = source.checkpoint.network
    if model.form == "deploy":
        raise ReparamError(
            f"verify: {shown_path(args.weights)} is in deploy form; expected the train-form "
            "checkpoint (verify fuses it and compares both forms)"
        )
    size = args.size if args.size is not None else _default_size(model)
    rng = np.random.default_rng(args.seed)
    batch = _batch(args)
    x = rng.standard_normal((batch, model.in_channels, size, size)).astype(model.dtype)
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
    _out(f"input: batch {batch}, {size}x{size}, seed {args.seed}")
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


def _batch(args: argparse.Namespace) -> int:
    """``--batch`` of ``verify`` on a checkpoint: 2 unless given."""
    return 2 if args.batch is None else int(args.batch)


def _verify_blocks(source: _Input, args: argparse.Namespace) -> int:
    """Check every block found: its fused conv against its train form on a random input."""
    checkpoint = source.checkpoint
    assert checkpoint is not None
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
    _out(f"blocks checked: {len(blocks)} (batch {_batch(args)}, seed {args.seed})")
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
    shape = (_batch(args), conv.in_channels, size, size)
    x = rng.standard_normal(shape).astype(np.promote_types(conv.kernel.dtype, np.float32))
    with np.errstate(over="ignore", invalid="ignore"):
        difference = float(np.max(np.abs(found.block(x) - conv(x))))
        magnitude = float(np.max(found.block.magnitude(x)))
    return difference / magnitude if magnitude > 0 else difference


def _run(args: argparse.Namespace) -> int:
    return _act(_open(args.weights, args, network_only=True), args)


def _run_network(source: _Input, args: argparse.Namespace) -> int:
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
    return _act(_open(args.weights, args), args)


def _info_network(source: _Input, args: argparse.Namespace) -> int:
    checkpoint = source.checkpoint
    assert checkpoint is not None and checkpoint.network is not None
    model = checkpoint.network
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
    if model.form == "train":
        _block_report(checkpoint, args)
    return 0


def _info_blocks(source: _Input, args: argparse.Namespace) -> int:
    checkpoint = source.checkpoint
    assert checkpoint is not None
    stored = ", ".join(checkpoint.stored_dtypes) or "no floating tensors"
    _out(f"tensors:       {len(checkpoint.tensors)} ({stored})")
    _block_report(checkpoint, args)
    return 0


def _block_report(checkpoint: Checkpoint, args: argparse.Namespace) -> None:
    _, report = convert_state_dict(checkpoint.tensors, overrides=_overrides(args), eps=args.eps)
    for line in report.lines():
        _out(line)


def _describe_strides(model: RepVGG) -> str:
    twos = [name for name, spec in model.specs if spec.stride == 2]
    shown_twos = ", ".join(twos[:6]) + (", ..." if len(twos) > 6 else "")
    return (
        f"2 at {shown_twos or 'no block'}; 1 elsewhere (an identity branch means 1; otherwise "
        "the RepVGG rule, 2 at a stage's first block; --set PREFIX.stride=S states one)"
    )


def _export(args: argparse.Namespace) -> int:
    return _act(_open(args.weights, args, network_only=True), args)


def _export_network(source: _Input, args: argparse.Namespace) -> int:
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
    return _act(_open(args.weights, args, network_only=True), args)


def _quant_report_network(source: _Input, args: argparse.Namespace) -> int:
    func = "quant-report"
    for path, suffix in ((args.json, ".json"), (args.png, ".png")):
        if path is not None:
            check_destination(path, func=func, allowed=(suffix,), what=f"--{suffix[1:]}")
    if args.png is not None:
        quant.check_plotting(func=func)
    with _file_errors(args.calibration, "read"):
        calibration = read_array(args.calibration, func=func)
    name = f"--calibration {shown_path(args.calibration)}"
    images = quant.check_images(calibration, None, func=func, name=name)  # before the model loads
    _progress(f"loading {args.weights} ...")
    with _file_errors(args.weights, "read"):
        model = load(args.weights, layout=args.layout, arch=args.arch)
    images = quant.check_images(images, model, func=func, name=name)  # and its channels
    _progress(f"quantizing {len(model.blocks)} blocks on {len(images)} images ...")

    def measured(done: int, total: int, layer: str) -> None:
        _progress(f"  layer {done}/{total}: {layer}")

    shown = args.progress or sys.stderr.isatty()
    found = quant.report(
        model, images, per_channel=args.per_channel, progress=measured if shown else None
    )
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
    given = args.checkpoint
    return _act(_open(given, args, network_only=True) if given else _Input("network", ""), args)


def _demo_network(source: _Input, args: argparse.Namespace) -> int:
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


# --------------------------------------------------------------------------- ONNX graphs


def _read_onnx(path: str) -> tuple[Graph, OnnxSource]:
    _progress(f"loading {path} ...")
    with _file_errors(path, "read"):
        return read_graph(path, func="load")


class _Folded(NamedTuple):
    graph: Graph  # as read
    source: OnnxSource
    report: FoldReport
    model: Any  # the folded onnx.ModelProto
    seconds: float  # folding and writing the model, not reading it


def _fold(path: str, args: argparse.Namespace) -> _Folded:
    """Read a graph and fold it."""
    graph, source = _read_onnx(path)
    _progress(f"folding {len(graph.ops)} ops ...")
    ratio = 1.0 if args.max_cost_ratio is None else args.max_cost_ratio
    start = time.perf_counter()
    folded, report = fold_graph(graph, max_cost_ratio=ratio)
    model = write_graph(folded, report, source)
    return _Folded(graph, source, report, model, time.perf_counter() - start)


def _convert_graph(source: _Input, args: argparse.Namespace) -> int:
    _progress(f"folding {source.path} ...")
    ratio = 1.0 if args.max_cost_ratio is None else args.max_cost_ratio
    start = time.perf_counter()
    with _file_errors(source.path, "read"):  # fold_onnx: the weights are held once, not twice
        model, report = fold_onnx(source.path, max_cost_ratio=ratio, func="load")
    seconds = time.perf_counter() - start
    if not report.folded:
        raise ReparamError(
            f"convert: nothing in {shown_path(source.path)} folds ({len(report.refused)} near "
            f"misses; reparam info {shown_path(source.path)} lists them); nothing was written"
        )
    with _file_errors(args.deploy, "write"):
        save_onnx(model, args.deploy)
    _out(f"{report.lines()[0]} (in {seconds:.3f} s)")
    if report.refused:
        _out(f"not folded: {len(report.refused)} (reparam info {source.path} says why)")
    _out(f"wrote {args.deploy}")
    return 0


def _info_graph(source: _Input, args: argparse.Namespace) -> int:
    graph, onnx_source, report, _, _ = _fold(source.path, args)
    model = onnx_source.model
    opsets = ", ".join(f"{o.domain or 'ai.onnx'} {o.version}" for o in model.opset_import)
    producer = f"{model.producer_name} {model.producer_version}".strip() or "unknown"
    _out(f"producer:      {producer}")
    _out(f"opsets:        {opsets}")
    for label, infos in (("input", model.graph.input), ("output", model.graph.output)):
        for info in infos:
            if info.name in graph.constants:
                continue
            _out(f"{label + ':':<15}{info.name} {_describe_value(info)}")
    affine = sum(op.kind != "opaque" for op in graph.ops)
    _out(f"ops:           {len(graph.ops)} ({affine} affine, {len(graph.ops) - affine} other)")
    for line in report.lines():
        _out(line)
    return 0


def _describe_value(info: Any) -> str:
    """``(batch, 3, 224, 224) float32`` for a graph input or output."""
    tensor = info.type.tensor_type
    dims = [
        str(d.dim_value) if d.HasField("dim_value") else (d.dim_param or "?")
        for d in tensor.shape.dim
    ]
    return f"({', '.join(dims)}) {_elem_name(tensor.elem_type)}"


def _elem_name(elem_type: int) -> str:
    """``float32``, ``bfloat16``, ... for an ONNX element type."""
    import onnx

    try:
        return str(np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem_type)).name)
    except (KeyError, TypeError, ValueError):
        return f"type {elem_type}"


def _import_onnxruntime(func: str) -> Any:
    try:
        return importlib.import_module("onnxruntime")
    except ImportError:
        raise ReparamError(
            f"{func}: onnxruntime is not installed; expected it to run both graphs "
            '(hint: pip install "reparam[onnx]")'
        ) from None


def _feeds(model: Any, args: argparse.Namespace) -> dict[str, npt.NDArray[Any]]:
    """Seeded random inputs of the graph's input shapes (a dynamic batch is 1)."""
    import onnx

    initializers = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initializers]
    if args.shape is not None and len(inputs) != 1:
        raise ReparamError(
            f"verify: --shape sets the shape of a graph's one input; this graph has "
            f"{len(inputs)} ({', '.join(shown(i.name) for i in inputs)})"
        )
    rng = np.random.default_rng(args.seed)
    feeds = {}
    for info in inputs:
        tensor = info.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else None for d in tensor.shape.dim]
        if args.shape is not None:
            if len(args.shape) != len(dims) or any(
                d is not None and d != g for d, g in zip(dims, args.shape, strict=False)
            ):
                raise ReparamError(
                    f"verify: --shape {','.join(map(str, args.shape))} does not fit input "
                    f"{shown(info.name)!r} of shape {_describe_value(info)}"
                )
            dims = list(args.shape)
        if dims and dims[0] is None:
            dims[0] = 1
        if any(d is None for d in dims):
            raise ReparamError(
                f"verify: input {shown(info.name)!r} has shape {_describe_value(info)} with "
                "dynamic dimensions besides the batch; expected --shape N,C,H,W"
            )
        shape = tuple(int(d) for d in dims if d is not None)
        try:
            dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type))
        except (KeyError, TypeError, ValueError):
            dtype = np.dtype(object)
        if dtype.kind == "f":
            feeds[info.name] = rng.standard_normal(shape).astype(dtype)
        elif dtype.kind in "iub":
            feeds[info.name] = rng.integers(0, 2, shape).astype(dtype)
        else:
            raise ReparamError(
                f"verify: input {shown(info.name)!r} has element type "
                f"{_elem_name(tensor.elem_type)}; expected float16, float32, float64, integers "
                "or bool"
            )
    return feeds


def _run_graph(
    ort: Any, model: Any, name: str, feeds: dict[str, npt.NDArray[Any]]
) -> dict[str, npt.NDArray[Any]]:
    """Run a model (external data already read in) in onnxruntime; outputs by name."""
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: warnings would break the one-line rule
    try:
        session = ort.InferenceSession(
            model.SerializeToString(), sess_options=options, providers=["CPUExecutionProvider"]
        )
        names = [o.name for o in session.get_outputs()]
        results = session.run(None, feeds)
    except Exception as exc:  # onnxruntime raises its own exception types
        raise ReparamError(
            f"verify: onnxruntime cannot run {name} ({type(exc).__name__}: {shown(exc, 160)})"
        ) from None
    return {key: np.asarray(value) for key, value in zip(names, results, strict=True)}


class _Difference(NamedTuple):
    """How far one output of the deploy graph is from the train graph's."""

    output: str
    difference: float  # max |train - deploy|
    magnitude: float  # max |train|
    relative: float
    tolerance: float
    finite: bool

    @property
    def ratio(self) -> float:
        return self.relative / self.tolerance

    @classmethod
    def of(cls, output: str, want: npt.NDArray[Any], got: npt.NDArray[Any]) -> _Difference:
        with np.errstate(over="ignore", invalid="ignore"):
            wide, wide_got = want.astype(np.float64), got.astype(np.float64)
            finite = bool(np.isfinite(wide).all() and np.isfinite(wide_got).all())
            difference = float(np.max(np.abs(wide - wide_got), initial=0.0))
            magnitude = float(np.max(np.abs(wide), initial=0.0))
        relative = difference / magnitude if magnitude > 0 else difference
        tolerance = VERIFY_TOLERANCE.get(want.dtype, 1e-2)
        return cls(output, difference, magnitude, relative, tolerance, finite)


def _verify_graph(source: _Input, args: argparse.Namespace) -> int:
    ort = _import_onnxruntime("verify")
    train_name = shown_path(source.path)
    if args.deploy_graph is not None:
        if _same_file(source.path, args.deploy_graph):
            raise ReparamError(
                f"verify: DEPLOY {shown_path(args.deploy_graph)} is the train file itself; "
                "comparing a graph with itself proves nothing"
            )
        if args.max_cost_ratio is not None:
            raise ReparamError(
                "verify: --max-cost-ratio applies only when verify folds the graph itself "
                "(without DEPLOY)"
            )
        _, train_source = _read_onnx(source.path)
        _, deploy_source = _read_onnx(args.deploy_graph)
        deploy, deploy_name = deploy_source.model, shown_path(args.deploy_graph)
        folded = f"deploy: {deploy_name}"
    else:
        _, train_source, report, deploy, _ = _fold(source.path, args)
        deploy_name = "the folded graph"
        folded = f"deploy: folded in memory ({len(report.folded)} regions)"
    train = train_source.model
    if any(t.ByteSize() >= 2**31 - 2**24 for t in (train, deploy)):
        raise ReparamError(
            "verify: a graph is over 2 GiB, too large to hand to onnxruntime in memory"
        )
    feeds = _feeds(train, args)
    _progress(f"running both graphs on {', '.join(str(x.shape) for x in feeds.values())} ...")
    expected = _run_graph(ort, train, train_name, feeds)
    actual = _run_graph(ort, deploy, deploy_name, feeds)
    if set(actual) != set(expected):
        raise ReparamError(
            f"verify: {deploy_name} has outputs {sorted(actual)}; expected the train graph's "
            f"{sorted(expected)}"
        )
    _out(f"train: {train_name}; {folded}")
    shapes = ", ".join(f"{key} {value.shape} {value.dtype}" for key, value in feeds.items())
    _out(f"input: {shapes}, seed {args.seed}")
    compared = []
    for key, want in expected.items():
        got = actual[key]
        if got.shape != want.shape:
            _out(f"FAIL: output {key!r} has shape {got.shape}; the train graph's is {want.shape}")
            return 1
        if np.issubdtype(want.dtype, np.floating):
            compared.append(_Difference.of(key, want, got))
    if not compared:
        _out("FAIL: the graph has no floating-point output to compare")
        return 1
    # the output furthest past (or nearest to) its tolerance; NaN sorts first
    worst = max(compared, key=lambda d: math.inf if d.relative != d.relative else d.ratio)
    key, difference, magnitude = worst.output, worst.difference, worst.magnitude
    relative, tolerance = worst.relative, worst.tolerance
    finite = all(d.finite for d in compared)
    _out(f"max |train - deploy| = {difference:.3e} (max |output| {magnitude:.3g}) at {key!r}")
    _out(f"relative difference  = {relative:.3e} (tolerance {tolerance:g})")
    if not finite:
        _out("FAIL: the outputs are not finite (NaN or inf), so the graphs cannot be compared")
        return 1
    if not relative <= tolerance:
        _out("FAIL: the deploy graph does not reproduce the train graph")
        return 1
    _out("OK: both graphs agree")
    return 0


#: What each command does with each kind of file (see :class:`_Input`).
_ACTIONS: dict[str, dict[str, Action]] = {
    "convert": {
        "network": _convert_network,
        "blocks": _convert_blocks,
        "graph": _convert_graph,
    },
    "verify": {"network": _verify_network, "blocks": _verify_blocks, "graph": _verify_graph},
    "info": {"network": _info_network, "blocks": _info_blocks, "graph": _info_graph},
    "run": {
        "network": _run_network,
        "graph": _instead(
            "run computes a RepVGG checkpoint's logits in NumPy (hint: run the graph with "
            "onnxruntime; reparam verify {path} compares it with its folded form)"
        ),
    },
    "export": {
        "network": _export_network,
        "graph": _instead(
            "export writes a checkpoint as ONNX (hint: reparam convert {path} DEPLOY.onnx folds "
            "the graph)"
        ),
    },
    "demo": {
        "network": _demo_network,
        "graph": _instead(
            "demo runs a RepVGG checkpoint (hint: reparam verify {path} runs the graph and its "
            "folded form)"
        ),
    },
    "quant-report": {
        "network": _quant_report_network,
        "graph": _instead(
            "quant-report reads a RepVGG checkpoint (hint: reparam convert {path} DEPLOY.onnx "
            "folds the graph; quantize that with onnxruntime.quantization)"
        ),
    },
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="reparam",
        description="Convert, verify and run RepVGG checkpoints in pure NumPy; fold ONNX graphs.",
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
            default=None,
            help=(
                "BatchNorm epsilon of every block (default: each family's published one, 1e-5, "
                "or 1e-3 for ultralytics, YOLOv7 and YOLOv9; YOLOv6 models use 1e-3)"
            ),
        )

    def max_cost_ratio(command: argparse.ArgumentParser) -> None:
        command.add_argument(
            "--max-cost-ratio",
            type=float,
            metavar="R",
            help="ONNX graphs: fold a region only if its one conv costs at most R times the "
            "multiply-adds of its parts (default 1: never slower; 'inf' folds all it can)",
        )

    convert = commands.add_parser(
        "convert", help="fuse a train checkpoint into deploy weights, or fold an ONNX graph"
    )
    convert.add_argument(
        "train", help="train-form checkpoint (.npz, .safetensors, .pth, .pt) or ONNX graph (.onnx)"
    )
    convert.add_argument(
        "deploy", help="output file; its suffix chooses the format (replaced atomically)"
    )
    max_cost_ratio(convert)
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
    verify.add_argument("weights", help="train-form checkpoint, or ONNX graph (.onnx)")
    verify.add_argument(
        "deploy_graph",
        nargs="?",
        metavar="DEPLOY",
        help="ONNX graphs: the folded graph to compare (default: fold the train graph in memory)",
    )
    layout(verify)
    arch(verify)
    verify.add_argument("--batch", type=int, help="images in the batch (default 2)")
    verify.add_argument(
        "--size", type=int, help="image side (default 64; 32 for custom architectures)"
    )
    verify.add_argument("--seed", type=int, default=0, help="seed of the random input")
    verify.add_argument(
        "--shape",
        type=_shape,
        metavar="N,C,H,W",
        help="ONNX graphs: the input's shape, for its dynamic dimensions (a dynamic batch is 1)",
    )
    max_cost_ratio(verify)
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

    info = commands.add_parser(
        "info", help="describe a checkpoint, or list what folds in an ONNX graph"
    )
    info.add_argument("weights", help="checkpoint, train or deploy form, or ONNX graph (.onnx)")
    max_cost_ratio(info)
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
    report.add_argument(
        "--progress",
        action="store_true",
        help="a line on stderr per layer measured (the default when stderr is a terminal)",
    )
    layout(report)
    arch(report)
    report.set_defaults(handler=_quant_report)
    return parser


def _shape(text: str) -> tuple[int, ...]:
    """``--shape N,C,H,W``: positive integers separated by commas."""
    try:
        shape = tuple(int(part) for part in text.split(","))
    except ValueError:
        shape = ()
    if not shape or min(shape) < 1:
        raise argparse.ArgumentTypeError(
            f"expected positive integers such as 1,3,224,224; got {text!r}"
        )
    return shape


def _positive(args: argparse.Namespace) -> None:
    for name in ("batch", "size"):
        value = getattr(args, name, None)
        if value is not None and value < 1:
            raise ReparamError(f"{args.command}: --{name} must be >= 1; got {value}")
    ratio = getattr(args, "max_cost_ratio", None)
    if ratio is not None and not ratio > 0:
        raise ReparamError(f"{args.command}: --max-cost-ratio must be > 0; got {ratio}")


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
