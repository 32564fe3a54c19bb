"""The PyTorch adapter: trace a module, fold every region that is one convolution, rebuild it.

:func:`fold_torch` traces a module in eval mode with ``torch.fx`` (with
``torch.export`` where fx cannot trace), translates each traced call into an
:class:`~reparam.graph.ir.Op`, lets :func:`~reparam.graph.fold.fold_graph`
decide what folds, and rewrites the traced graph: each folded region becomes
one ``nn.Conv2d`` holding the fused kernel and bias; every other call is the
traced code calling the module's own submodules and parameters. What folds is
decided in :mod:`reparam.graph.fold` alone; this module only translates.

What is translated (everything else is ``opaque`` and ends a region):

==============  ====================================================================
kind            PyTorch
==============  ====================================================================
conv            ``nn.Conv2d`` (``padding_mode="zeros"``; ``"same"`` and ``"valid"``
                resolved), ``F.conv2d``, ``aten.conv2d``, ``aten.convolution``, with a
                weight and bias computed from parameters alone. A crop of the input
                (``x[:, :, a:h - b]``) read only by the conv becomes its negative padding.
linear          ``nn.Linear``, ``F.linear``, ``aten.linear`` on ``(N, C)`` features
batch_norm      ``nn.BatchNorm2d`` (``nn.BatchNorm1d`` on features) with running
                statistics, ``F.batch_norm`` and ``torch.batch_norm`` with
                ``training=False``, ``aten.batch_norm``,
                ``aten._native_batch_norm_legit_no_training``
add, sub        ``+``, ``-``, ``torch.add``/``sub`` (``alpha`` included), the Tensor
                methods, the aten ops: of two computed tensors, or of one and a constant
mul, div        ``*``, ``/``, ``torch.mul``/``div`` (no ``rounding_mode``), the methods,
                the aten ops, by a constant (a parameter, a buffer, a Python number)
neg             unary ``-``, ``torch.neg``, ``.neg()``
pad             ``F.pad`` (mode ``"constant"``), ``nn.ZeroPad2d``, ``nn.ConstantPad2d``,
                ``aten.constant_pad_nd``; and a constant-filled tensor with a computed one
                written into its middle (Diverse Branch Block's ``BNAndPadLayer``): a pad
                with one value per channel
avg_pool        ``nn.AvgPool2d``, ``F.avg_pool2d``, ``aten.avg_pool2d`` (``ceil_mode=False``,
                no ``divisor_override``)
identity        ``nn.Identity``, dropout in eval mode, ``.clone()``, ``.contiguous()``
==============  ====================================================================

A *constant* is anything computed from parameters and buffers alone (and from
the number of channels of a tensor): its value is read from one run of the
module on the example inputs. In-place operations are followed: a tensor
written in place is a new tensor for what reads it afterwards, and a value
read before the write is never moved after it. Under ``torch.export`` (the
fallback) the graph is made of aten ops: crops and Diverse Branch Block's
padding are written there as slices and copies, which this module does not
read, so they stay as they are. ``torch`` is imported only when
:func:`fold_torch` is called.
"""

from __future__ import annotations

import dataclasses
import inspect
import operator
import traceback
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from ..core.errors import ReparamError
from .fold import FoldedRegion, FoldReport, Refusal, fold_graph
from .ir import Graph, Op

if TYPE_CHECKING:
    import torch
    from torch import fx

__all__ = ["fold_torch"]

_FUNC = "fold_torch"
_THIS_FILE = __file__
_Array = npt.NDArray[Any]
_Dim = tuple[str, int]  # (node name, axis): one axis of a traced tensor's shape

#: Attributes and methods that read a tensor's metadata, never its values.
_SHAPE_ATTRS = frozenset({"shape", "dtype", "device", "ndim", "is_cuda", "layout", "requires_grad"})
_SHAPE_METHODS = frozenset(
    {"size", "dim", "ndimension", "numel", "nelement", "get_device", "is_contiguous",
     "element_size", "is_floating_point"}
)  # fmt: skip
#: In-place methods that change no value.
_METADATA_INPLACE = frozenset({"requires_grad_", "share_memory_", "retain_grad"})


def _import_torch() -> Any:
    try:
        import torch
        import torch.fx
    except ImportError:
        raise ReparamError(
            f"{_FUNC}: PyTorch is not installed; expected it to trace the module "
            "(hint: pip install torch)"
        ) from None
    return torch


# --------------------------------------------------------------------------- public


def fold_torch(
    module: torch.nn.Module,
    example_inputs: Any,
    *,
    max_cost_ratio: float = 1.0,
) -> tuple[fx.GraphModule, FoldReport]:
    """Fold every part of an eval-mode module that is one convolution into one ``nn.Conv2d``.

    The module is traced (``torch.fx.symbolic_trace``; ``torch.export`` where
    fx cannot trace), translated into a :class:`~reparam.graph.ir.Graph`,
    folded by :func:`~reparam.graph.fold.fold_graph`, and rebuilt. No
    ``switch_to_deploy`` method is needed: any block written with PyTorch's
    convolutions, BatchNorms, sums, scales, pads and average pools folds.

    Parameters
    ----------
    module : torch.nn.Module
        In eval mode (every submodule). Not modified.
    example_inputs : Tensor or tuple of Tensor
        The positional inputs of ``module.forward``, run once: shapes, dtypes and
        the values computed from parameters alone are read from that run. The
        result runs at other batch sizes (and, when traced by fx, other image
        sizes) too.
    max_cost_ratio : float, default 1.0
        As in :func:`~reparam.graph.fold.fold_graph`: 1.0 never folds a region
        into a conv that costs more multiply-adds than its parts.

    Returns
    -------
    folded : torch.fx.GraphModule
        Each folded region is one ``nn.Conv2d`` submodule named
        ``<scope>.reparam_conv`` (``bias=True``, the region's stride, groups,
        dilation; symmetric padding as ``padding``, other padding as an
        ``F.pad`` before it), in the dtype and on the device of the region's
        output: its weights are computed in float64 and rounded once. Every
        other call is the traced code calling the *same* submodules and
        parameters as ``module`` (shared, not copied: ``copy.deepcopy`` the
        result to separate them). In eval mode; ``state_dict()`` and
        ``torch.onnx.export`` work as for any module, ``torch.save`` of the whole
        module too when fx traced it (one torch.export traced holds torch.export's
        guard function, which does not pickle: save its state dict).
    report : FoldReport
        Each region folded (its conv named as the submodule) and each place a
        candidate stops, with the reason.

    Raises
    ------
    ReparamError
        If a submodule is in training mode, ``example_inputs`` are not tensors,
        neither fx nor ``torch.export`` can trace the module (the message names
        the line fx stopped at), or the trace does not compute what the module
        computes on ``example_inputs`` (random numbers, Python state).

    Notes
    -----
    A region is replaced by a conv on the region's source: the tensor it reads
    (an input of the module, or the output of an op that does not fold). What
    reads the region's output reads the conv. Nodes only the region used (its
    parameters, shape arithmetic) are dropped; the original module keeps its
    BatchNorms. Values computed from parameters alone (a kernel built in
    ``forward``, a padding value from a BatchNorm's statistics) are constants,
    and a condition on parameters alone (``if self.alpha:``) is decided by
    their values, as the fold itself is. Regions on ``(N, C)`` features (a
    BatchNorm1d before a classifier) become one ``nn.Linear``.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> from reparam.graph import fold_torch
    >>> class Block(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.conv3, self.bn3 = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
    ...         self.conv1, self.bn1 = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)
    ...     def forward(self, x):
    ...         return torch.relu(self.bn3(self.conv3(x)) + self.bn1(self.conv1(x)) + x)
    >>> block = Block().eval()
    >>> folded, report = fold_torch(block, torch.randn(1, 4, 8, 8))
    >>> for line in folded.code.strip().splitlines():  # what the folded module runs
    ...     print(line.strip())
    def forward(self, x):
    reparam_conv = self.reparam_conv(x);  x = None
    relu = torch.relu(reparam_conv);  reparam_conv = None
    return relu
    >>> print(report.folded[0].line())  # doctest: +ELLIPSIS
    folded 6 ops into Conv 'reparam_conv' (3x3, 4->4, stride (1, 1), pads ((1, 1), (1, 1)), ...
    >>> x = torch.randn(3, 4, 10, 12)
    >>> bool((folded(x) - block(x)).abs().max() < 1e-5)
    True
    """
    torch = _import_torch()
    module = _check_module(module, torch)
    inputs = _check_inputs(example_inputs, torch)
    if (
        isinstance(max_cost_ratio, bool)
        or not isinstance(max_cost_ratio, int | float)
        or not max_cost_ratio > 0
    ):
        raise ReparamError(f"{_FUNC}: max_cost_ratio must be a number > 0; got {max_cost_ratio!r}")
    gm, record = _trace(module, inputs, torch)
    originals = {id(m) for m in module.modules()}
    atomic: set[str] = set()
    pinned: set[str] = set()
    carried: list[Refusal] = []  # refusals inside a call that is translated whole next round
    for _ in range(len(gm.graph.nodes) + 1):
        built = _Translator(gm, record, atomic, pinned, torch).build()
        folded_graph, report = fold_graph(built.graph, max_cost_ratio=max_cost_ratio)
        plan = _plan(gm, built, report)
        if not plan.atomic and not plan.pinned:
            break
        if plan.atomic <= atomic and plan.pinned <= pinned:  # pragma: no cover - a bug guard
            raise ReparamError(f"{_FUNC}: the rewrite does not converge; this is a bug")
        carried += [r for r in report.refused if set(built.op_nodes.get(r.at, ())) & plan.atomic]
        atomic |= plan.atomic
        pinned |= plan.pinned
    report = _apply(gm, built, folded_graph, report, plan, originals, torch)
    if carried:
        seen = {r.line() for r in report.refused}
        extra = tuple(r for r in carried if r.line() not in seen)
        report = dataclasses.replace(report, refused=report.refused + extra)
    return gm, report


# --------------------------------------------------------------------------- checks


def _check_module(module: Any, torch: Any) -> Any:
    if not isinstance(module, torch.nn.Module):
        raise ReparamError(
            f"{_FUNC}: module must be a torch.nn.Module; got {type(module).__name__}"
        )
    training = [name or type(m).__name__ for name, m in module.named_modules() if m.training]
    if training:
        more = f" and {len(training) - 3} more" if len(training) > 3 else ""
        raise ReparamError(
            f"{_FUNC}: the module is in training mode (BatchNorm would use batch statistics); "
            f"got training=True on {', '.join(map(repr, training[:3]))}{more}, expected eval "
            "mode (hint: call module.eval() first)"
        )
    return module


def _check_inputs(example_inputs: Any, torch: Any) -> tuple[Any, ...]:
    inputs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else example_inputs
    if not isinstance(inputs, tuple | list) or not all(isinstance(t, torch.Tensor) for t in inputs):
        kinds = (
            type(inputs).__name__
            if not isinstance(inputs, tuple | list)
            else f"{type(inputs).__name__} of " + ", ".join(type(t).__name__ for t in inputs)
        )
        raise ReparamError(
            f"{_FUNC}: example_inputs must be a tensor or a tuple of tensors (the positional "
            f"inputs of forward); got {kinds}"
        )
    return tuple(inputs)


# --------------------------------------------------------------------------- tracing


@dataclass
class _Record:
    """One run of the traced graph: each node's value and the version of each tensor it read."""

    values: dict[str, Any]
    read_versions: dict[tuple[str, str], int]  # (reader, read node) -> tensor._version then
    output: Any  # what the traced graph returned


def _trace(module: Any, inputs: tuple[Any, ...], torch: Any) -> tuple[Any, _Record]:
    """Trace ``module`` (fx first, then torch.export) and run the trace once."""
    try:
        gm = _fx_trace(module, torch)
        record = _record(gm, inputs, torch)
    except Exception as exc:  # whatever the forward raises on proxies
        fx_error = exc
    else:
        _check_reproduces(module, inputs, record, "torch.fx", torch)
        return gm, record
    try:
        # torch.export fixes a size of 1 (a batch of one would stay one): trace two
        inputs = tuple(
            t.expand(2, *t.shape[1:]).clone() if t.ndim and t.shape[0] == 1 else t for t in inputs
        )
        dims = tuple(
            {axis: torch.export.Dim.AUTO for axis in (0, 2, 3) if axis < t.ndim} or None
            for t in inputs
        )
        with warnings.catch_warnings():  # torch.export warns about its own internals
            warnings.simplefilter("ignore")
            program = torch.export.export(module, inputs, dynamic_shapes=dims)
            exported = program.module()
        # a plain GraphModule (torch.export's refuses train(), which exporters call)
        gm = torch.fx.GraphModule(exported, exported.graph, class_name=type(module).__name__)
        gm._in_spec, gm._out_spec = exported._in_spec, exported._out_spec
        gm.recompile()
        record = _record(gm, inputs, torch)
    except Exception as exc:
        export_error = exc
    else:
        _check_reproduces(module, inputs, record, "torch.export", torch)
        return gm, record
    raise ReparamError(
        f"{_FUNC}: cannot trace {type(module).__name__}: torch.fx stops at "
        f"{_user_line(fx_error, torch)} ({_short(fx_error)}), and torch.export fails too "
        f"({_short(export_error)}); expected a forward whose control flow does not depend on "
        "tensor values (hint: compute the condition outside forward, or use torch.where)"
    ) from export_error


def _fx_trace(module: Any, torch: Any) -> Any:
    """``torch.fx`` tracing that also records item assignment (``t[...] = v``)."""
    proxy_base: Any = torch.fx.Proxy
    tracer_base: Any = torch.fx.Tracer

    class Proxy(proxy_base):  # type: ignore[misc]
        def __setitem__(self, key: Any, value: Any) -> None:
            self.tracer.create_proxy("call_function", operator.setitem, (self, key, value), {})

    class Tracer(tracer_base):  # type: ignore[misc]
        def proxy(self, node: Any) -> Any:
            return Proxy(node, self)

        def to_bool(self, obj: Any) -> bool:
            # a condition on parameters alone (``if self.alpha:``) is decided by their values
            found, value = _evaluate_constant(obj.node, self.root, {})
            return bool(value) if found else bool(super().to_bool(obj))

    # fx stores tensors it meets as attributes of the root (``_tensor_constant0``): trace a
    # shallow copy so that ``module`` itself gains nothing
    root = module.__class__.__new__(module.__class__)
    root.__dict__.update(module.__dict__)
    tracer = Tracer()
    graph = tracer.trace(root)
    return torch.fx.GraphModule(root, graph, class_name=type(module).__name__)


def _evaluate_constant(node: Any, root: Any, memo: dict[Any, Any]) -> tuple[bool, Any]:
    """Return ``(True, value)`` for a traced node computed from parameters alone."""
    if node in memo:
        return memo[node]  # type: ignore[no-any-return]
    result: tuple[bool, Any] = (False, None)
    if node.op == "get_attr":
        value: Any = root  # read around nn.Module.__getattr__, which fx patches to trace
        for part in str(node.target).split("."):
            for store in ("_parameters", "_buffers", "_modules"):
                if part in vars(value).get(store, {}):
                    value = vars(value)[store][part]
                    break
            else:
                value = object.__getattribute__(value, part)
        result = (True, value)
    elif node.op in ("call_function", "call_method"):
        unknown = False

        def resolve(arg: Any) -> Any:
            nonlocal unknown
            if _is_node(arg):
                found, value = _evaluate_constant(arg, root, memo)
                unknown = unknown or not found
                return value
            if isinstance(arg, tuple | list):
                return type(arg)(resolve(a) for a in arg)
            if isinstance(arg, dict):
                return {k: resolve(v) for k, v in arg.items()}
            return arg

        args, kwargs = resolve(node.args), resolve(node.kwargs)
        if not unknown:
            if node.op == "call_function":
                result = (True, node.target(*args, **kwargs))
            else:
                result = (True, getattr(args[0], node.target)(*args[1:], **kwargs))
    memo[node] = result
    return result


def _record(gm: Any, inputs: tuple[Any, ...], torch: Any) -> _Record:
    values: dict[str, Any] = {}
    read_versions: dict[tuple[str, str], int] = {}

    class Recorder(torch.fx.Interpreter):  # type: ignore[misc]
        def run_node(self, n: Any) -> Any:
            for a in n.all_input_nodes:
                value = self.env.get(a)
                if isinstance(value, torch.Tensor) and not value.is_inference():
                    read_versions[(n.name, a.name)] = value._version
            result = super().run_node(n)
            values[n.name] = result
            return result

    with torch.no_grad():
        output = Recorder(gm, garbage_collect_values=False).run(*inputs)
    return _Record(values, read_versions, output)


def _check_reproduces(
    module: Any, inputs: tuple[Any, ...], record: _Record, tracer: str, torch: Any
) -> None:
    """Refuse a trace that does not compute what the module computes on the example inputs.

    A trace fixes what Python computed while tracing: random numbers drawn outside the graph,
    Python state read once. The same ops in the same order give the same result, so any
    difference beyond rounding means the trace is not the module.
    """
    with torch.no_grad():
        expected = module(*inputs)
    leaves = torch.utils._pytree.tree_leaves
    wanted, got = leaves(expected), leaves(record.output)
    problem = None
    if len(wanted) != len(got):
        problem = f"{len(got)} outputs instead of {len(wanted)}"
    for a, b in zip(got, wanted, strict=False):
        if problem is not None or not isinstance(b, torch.Tensor):
            continue
        if not isinstance(a, torch.Tensor) or a.shape != b.shape or a.dtype != b.dtype:
            problem = "an output of another shape or dtype"
        elif b.is_floating_point() and b.numel():
            scale = float(b.detach().abs().max().double())
            diff = float((a.detach().double() - b.detach().double()).abs().max())
            if not diff <= 1e-3 * scale:
                problem = f"outputs differing by {diff:.3g} (largest |output| {scale:.3g})"
        elif not torch.equal(a, b):
            problem = "an integer output that differs"
    if problem is not None:
        raise ReparamError(
            f"{_FUNC}: the {tracer} trace of {type(module).__name__} does not compute what the "
            f"module computes on example_inputs: {problem}; expected a forward that draws no "
            "random numbers and reads no Python state that changes between calls"
        )


def _user_line(exc: BaseException, torch: Any) -> str:
    """Return ``file.py:12 (if x.sum() > 0:)``: the last frame of the traceback outside torch."""
    torch_dir = str(Path(torch.__file__).parent)
    frames = [
        f
        for f in traceback.extract_tb(exc.__traceback__)
        if not f.filename.startswith(torch_dir) and f.filename != _THIS_FILE
    ]
    if not frames:
        return "an unknown line"
    frame = frames[-1]
    return f"{Path(frame.filename).name}:{frame.lineno} ({(frame.line or '').strip()})"


def _short(exc: BaseException, limit: int = 160) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --------------------------------------------------------------------------- symbolic sizes


@dataclass(frozen=True)
class _Lin:
    """An integer ``sum(coef * size) + const`` over axes of traced tensors."""

    terms: frozenset[tuple[_Dim, int]]
    const: int

    @staticmethod
    def of(value: int) -> _Lin:
        return _Lin(frozenset(), int(value))

    @staticmethod
    def axis(node: str, axis: int) -> _Lin:
        return _Lin(frozenset({((node, axis), 1)}), 0)

    def _combine(self, other: _Lin, sign: int) -> _Lin:
        coef: dict[_Dim, int] = dict(self.terms)
        for dim, c in other.terms:
            coef[dim] = coef.get(dim, 0) + sign * c
        return _Lin(
            frozenset((d, c) for d, c in coef.items() if c), self.const + sign * other.const
        )

    def __add__(self, other: _Lin) -> _Lin:
        return self._combine(other, 1)

    def __sub__(self, other: _Lin) -> _Lin:
        return self._combine(other, -1)

    def scaled(self, factor: int) -> _Lin:
        return _Lin(
            frozenset((d, c * factor) for d, c in self.terms if c * factor), self.const * factor
        )

    @property
    def constant(self) -> int | None:
        return None if self.terms else self.const

    @property
    def dims(self) -> frozenset[_Dim]:
        return frozenset(d for d, _ in self.terms)


# --------------------------------------------------------------------------- translation


@dataclass
class _Built:
    """A translated graph, and where each of its ops and tensors is in the traced graph."""

    graph: Graph
    op_nodes: dict[str, tuple[str, ...]]  # IR op -> the fx nodes it stands for
    node_ops: dict[str, list[str]]  # fx node -> its IR ops
    tensors: dict[str, tuple[str, int]]  # IR tensor -> (fx node, version)
    position: dict[str, int]  # fx node -> index in the traced graph
    mutations: dict[str, list[int]]  # fx node -> positions of the writes that version it
    scopes: dict[str, tuple[str, ...]]  # fx node -> module paths it was called in
    values: dict[str, Any]  # fx node -> its value on the example inputs


_REQUIRED = object()

# Positional signatures of the torch functions translated here (builtins have no signature).
_SIG_CONV = (("input", _REQUIRED), ("weight", _REQUIRED), ("bias", None), ("stride", 1),
             ("padding", 0), ("dilation", 1), ("groups", 1))  # fmt: skip
_SIG_F_BN = (("input", _REQUIRED), ("running_mean", _REQUIRED), ("running_var", _REQUIRED),
             ("weight", None), ("bias", None), ("training", False), ("momentum", 0.1),
             ("eps", 1e-5))  # fmt: skip
_SIG_TORCH_BN = (("input", _REQUIRED), ("weight", _REQUIRED), ("bias", _REQUIRED),
                 ("running_mean", _REQUIRED), ("running_var", _REQUIRED),
                 ("training", _REQUIRED), ("momentum", _REQUIRED), ("eps", _REQUIRED),
                 ("cudnn_enabled", True))  # fmt: skip
_SIG_PAD = (("input", _REQUIRED), ("pad", _REQUIRED), ("mode", "constant"), ("value", None))
_SIG_POOL = (("input", _REQUIRED), ("kernel_size", _REQUIRED), ("stride", None),
             ("padding", 0), ("ceil_mode", False), ("count_include_pad", True),
             ("divisor_override", None))  # fmt: skip
_SIG_DROPOUT = (("input", _REQUIRED), ("p", 0.5), ("training", True), ("inplace", False))
_SIG_BINARY = (("input", _REQUIRED), ("other", _REQUIRED), ("alpha", 1), ("rounding_mode", None))
_SIG_CLONE = (("input", _REQUIRED), ("memory_format", None))
_SIG_LINEAR = (("input", _REQUIRED), ("weight", _REQUIRED), ("bias", None))


def _bind(
    signature: Sequence[tuple[str, Any]], args: Sequence[Any], kwargs: dict[str, Any]
) -> dict[str, Any] | None:
    """Arguments by name with defaults, or None when they do not fit the signature."""
    names = [name for name, _ in signature]
    if len(args) > len(names) or any(k not in names for k in kwargs):
        return None
    bound = dict(zip(names, args, strict=False))
    for name, default in signature:
        if name in bound:
            if name in kwargs:
                return None
            continue
        if name in kwargs:
            bound[name] = kwargs[name]
        elif default is _REQUIRED:
            return None
        else:
            bound[name] = default
    return bound


def _bind_schema(target: Any, args: Sequence[Any], kwargs: dict[str, Any]) -> dict[str, Any] | None:
    """Arguments of an aten op by its schema's names, defaults filled in."""
    arguments = target._schema.arguments
    signature = [
        (a.name, a.default_value if a.has_default_value() else _REQUIRED) for a in arguments
    ]
    return _bind(signature, args, kwargs)


def _pair(value: Any) -> tuple[int, int] | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return (value, value)
    if isinstance(value, tuple | list) and all(isinstance(v, int) for v in value):
        if len(value) == 1:
            return (int(value[0]), int(value[0]))
        if len(value) == 2:
            return (int(value[0]), int(value[1]))
    return None


class _Translator:
    """Translate a traced graph into an IR graph, node by node in graph order."""

    def __init__(
        self, gm: Any, record: _Record, atomic: set[str], pinned: set[str], torch: Any
    ) -> None:
        self.gm = gm
        self.torch = torch
        self.values = record.values
        self.read_versions = record.read_versions
        self.atomic = atomic
        self.pinned = pinned
        self.nodes = list(gm.graph.nodes)
        self.by_name = {n.name: n for n in self.nodes}
        self.modules = dict(gm.named_modules())
        self.position = {n.name: i for i, n in enumerate(self.nodes)}
        # analysis state, filled in graph order
        self.computed: set[str] = set()  # nodes whose value depends on the inputs' values
        self.static_computed: set[str] = set()  # ... when they are computed (before writes)
        self.sym: dict[str, _Lin | tuple[_Lin, ...]] = {}
        self.deps: dict[str, frozenset[_Dim]] = {}  # shape axes a constant depends on
        self.version: dict[str, int] = {}
        self.mutations: dict[str, list[int]] = {}
        self.unreliable: set[str] = set()
        self.storage: dict[str, int] = {}
        # output
        self.ops: list[Op] = []
        self.op_names: set[str] = set()
        self.op_nodes: dict[str, tuple[str, ...]] = {}
        self.node_ops: dict[str, list[str]] = {}
        self.constants: dict[str, _Array] = {}
        self.constant_of: dict[int, str] = {}
        self.tensors: dict[str, tuple[str, int]] = {}
        self.shapes: dict[str, tuple[int | None, ...]] = {}
        self.inputs: list[str] = []
        self.outputs: list[str] = []
        self.pending_crops: dict[str, tuple[Any, tuple[int, int, int, int], str]] = {}
        self.node_names = set(self.by_name)
        self.extra: dict[str, tuple[str, ...]] = {}  # IR op -> other fx nodes it stands for

    # ------------------------------------------------------------------ driver

    def build(self) -> _Built:
        for n in self.nodes:
            self._visit(n)
        for name in sorted(self.pinned):
            self.outputs += [t for t, (node, _) in self.tensors.items() if node == name]
        graph = Graph(
            tuple(self.ops),
            tuple(self.inputs),
            tuple(dict.fromkeys(self.outputs)),
            self.constants,
            self.shapes,
        )
        scopes = {n.name: _scope(n) for n in self.nodes}
        return _Built(
            graph, self.op_nodes, self.node_ops, self.tensors, self.position, self.mutations,
            scopes, self.values,
        )  # fmt: skip

    def _visit(self, n: Any) -> None:
        value = self.values.get(n.name)
        if isinstance(value, self.torch.Tensor):
            key = _storage_key(value)
            if key is not None:
                self.storage[n.name] = key
        if n.op == "placeholder":
            self.computed.add(n.name)
            if isinstance(value, self.torch.Tensor):
                self.inputs.append(self._tensor(n.name))
            return
        if n.op == "output":
            for a in _flat_nodes(n.args):
                if a.name in self.computed:
                    self.outputs.append(self._current(a.name))
            return
        if n.op == "get_attr":
            self.deps[n.name] = frozenset()
            return
        if self._shape_query(n):
            return
        reads = [a for a in n.all_input_nodes if a.name in self.computed]
        mutated = self._mutated(n)
        if not reads and not _random(n):  # from parameters (and sizes) alone: a constant
            self._constant_node(n, mutated)
            return
        self.computed.add(n.name)
        self.static_computed.add(n.name)
        ops = None if n.name in self.atomic else self._affine(n, mutated)
        if ops is None:
            ops = self._opaque(n, mutated)
        for op in ops:
            self._add(op, (n.name, *self.extra.get(op.name, ())))
        crop = self.pending_crops.pop(n.name, None)
        if crop is not None:  # the conv reading a crop did not take it over
            self._emit_crop_op(crop)

    # ------------------------------------------------------------------ bookkeeping

    def _tensor(self, node: str, version: int = 0) -> str:
        name = node if version == 0 else f"{node}@{version}"
        self.tensors[name] = (node, version)
        value = self.values.get(node)
        if isinstance(value, self.torch.Tensor):
            self.shapes[name] = _ir_shape(value)
        return name

    def _current(self, node: str) -> str:
        return self._tensor(node, self.version.get(node, 0))

    def _op_name(self, n: Any, suffix: str = "") -> str:
        if n.op == "call_module" and not suffix:
            base = str(n.target)
        else:
            scope = _scope(n)
            base = f"{scope[-1]}.{n.name}" if scope else n.name
            base += suffix
        name, index = base, 1
        while name in self.op_names:
            index += 1
            name = f"{base}#{index}"
        self.op_names.add(name)
        return name

    def _add(self, op: Op, nodes: tuple[str, ...]) -> None:
        self.ops.append(op)
        self.op_nodes[op.name] = tuple(dict.fromkeys(nodes))
        for node in self.op_nodes[op.name]:
            self.node_ops.setdefault(node, []).append(op.name)

    def _label(self, n: Any) -> str:
        if n.op == "call_module":
            return type(self.modules[n.target]).__name__
        if n.op == "call_method":
            return f".{n.target}"
        return str(getattr(n.target, "__name__", n.target))

    # ------------------------------------------------------------------ constants and sizes

    def _shape_query(self, n: Any) -> bool:
        """Metadata reads and integer arithmetic on sizes: no op, a symbolic value."""
        torch = self.torch
        aten = torch.ops.aten
        target, args = n.target, n.args
        if n.op == "call_function" and target is getattr and len(args) == 2:
            owner, attr = args
            if attr in _SHAPE_ATTRS and _is_node(owner):
                if attr == "shape":
                    self.sym[n.name] = self._shape_of(owner)
                self.deps[n.name] = self._shape_deps(owner, attr)
                return True
        if n.op == "call_method" and target in _SHAPE_METHODS and args and _is_node(args[0]):
            owner = args[0]
            if target == "size":
                shape = self._shape_of(owner)
                if len(args) == 1 and not n.kwargs:
                    self.sym[n.name] = shape
                elif (
                    len(args) == 2
                    and isinstance(args[1], int)
                    and -len(shape) <= args[1] < len(shape)
                ):
                    self.sym[n.name] = shape[args[1]]
            self.deps[n.name] = self._shape_deps(owner, str(target), n.name)
            return True
        if n.op == "call_function" and target in (aten.sym_size.int,) and _is_node(args[0]):
            shape = self._shape_of(args[0])
            if isinstance(args[1], int) and -len(shape) <= args[1] < len(shape):
                self.sym[n.name] = shape[args[1]]
            self.deps[n.name] = self._shape_deps(args[0], "size", n.name)
            return True
        if n.op == "call_function" and target in (
            aten.sym_numel.default, aten.sym_stride.int, aten.sym_storage_offset.default,
            aten._assert_tensor_metadata.default,
        ) and args and _is_node(args[0]):  # fmt: skip
            self.deps[n.name] = self._shape_deps(args[0], "numel")
            return True
        inputs = n.all_input_nodes
        if (
            inputs
            and all(a.name in self.sym or a.name in self.deps for a in inputs)
            and all(a.name not in self.computed for a in inputs)
        ):
            value = self.values.get(n.name)
            if isinstance(value, int | tuple | list) and not isinstance(value, bool):
                result = self._size_arithmetic(n)
                if result is not None:
                    self.sym[n.name] = result
                    self.deps[n.name] = _lin_dims(result)
                    return True
        return False

    def _shape_of(self, node: Any) -> tuple[_Lin, ...]:
        value = self.values.get(node.name)
        shape = tuple(value.shape) if isinstance(value, self.torch.Tensor) else ()
        if node.name not in self.computed and not self.deps.get(node.name):
            return tuple(_Lin.of(int(s)) for s in shape)
        return tuple(_Lin.axis(node.name, axis) for axis in range(len(shape)))

    def _shape_deps(self, owner: Any, attr: str, name: str | None = None) -> frozenset[_Dim]:
        if attr in ("dtype", "device", "layout", "is_cuda", "requires_grad", "get_device",
                    "is_floating_point", "element_size", "dim", "ndimension", "ndim"):  # fmt: skip
            return frozenset()
        if name is not None and isinstance(self.sym.get(name), _Lin):
            return _lin_dims(self.sym[name])
        return frozenset(d for lin in self._shape_of(owner) for d in lin.dims)

    def _size_arithmetic(self, n: Any) -> _Lin | tuple[_Lin, ...] | None:
        args = [self._sym_arg(a) for a in n.args]
        target = n.target
        if n.kwargs or any(a is None for a in args):
            return None
        if target is operator.getitem and len(args) == 2 and isinstance(args[0], tuple):
            index = n.args[1]
            if isinstance(index, int) and -len(args[0]) <= index < len(args[0]):
                return args[0][index]
            if isinstance(index, slice):
                return args[0][index]
            return None
        if any(not isinstance(a, _Lin) for a in args):
            return None
        lins: list[_Lin] = [a for a in args if isinstance(a, _Lin)]
        if target is operator.add and len(lins) == 2:
            return lins[0] + lins[1]
        if target is operator.sub and len(lins) == 2:
            return lins[0] - lins[1]
        if target is operator.neg and len(lins) == 1:
            return lins[0].scaled(-1)
        if target is operator.mul and len(lins) == 2:
            if lins[0].constant is not None:
                return lins[1].scaled(lins[0].constant)
            if lins[1].constant is not None:
                return lins[0].scaled(lins[1].constant)
        if target is operator.floordiv and len(lins) == 2:
            a, b = lins[0].constant, lins[1].constant
            if a is not None and b:
                return _Lin.of(a // b)
        return None

    def _sym_arg(self, arg: Any) -> _Lin | tuple[_Lin, ...] | None:
        if isinstance(arg, bool):
            return None
        if isinstance(arg, int):
            return _Lin.of(arg)
        if _is_node(arg):
            return self.sym.get(arg.name)
        if isinstance(arg, slice):
            return ()  # a slice index, read by getitem itself
        return None

    def _lin(self, arg: Any) -> _Lin | None:
        value = self._sym_arg(arg)
        return value if isinstance(value, _Lin) else None

    def _constant_node(self, n: Any, mutated: list[Any]) -> None:
        deps: set[_Dim] = set()
        for a in n.all_input_nodes:
            deps |= self.deps.get(a.name, frozenset())
        self.deps[n.name] = frozenset(deps)
        for target in mutated:
            for alias in self._aliases(target, n):
                if self.by_name[alias].op in ("get_attr", "placeholder"):
                    self.unreliable.add(alias)  # persistent state written by forward

    def _constant(self, arg: Any, reader: Any) -> str | None:
        """Return the IR constant ``reader`` reads as ``arg`` (from parameters, or a number)."""
        torch = self.torch
        if isinstance(arg, bool):
            return None
        if isinstance(arg, int | float):
            return self._number(float(arg), reader)
        if not _is_node(arg) or arg.name in self.computed or arg.name in self.unreliable:
            return None
        if any(axis != 1 for _, axis in self.deps.get(arg.name, frozenset())):
            return None  # depends on the batch or image size
        value = self.values.get(arg.name)
        if isinstance(value, int | float) and not isinstance(value, bool):
            return self._number(float(value), reader)
        if not isinstance(value, torch.Tensor) or not value.is_floating_point():
            return None
        read = self.read_versions.get((reader.name, arg.name))
        if read is not None and read != value._version:
            return None  # written in place after this read
        name = str(arg.target) if arg.op == "get_attr" else f"{arg.name}:value"
        return self._constant_array(name, value)

    def _constant_array(self, name: str, value: Any) -> str:
        known = self.constant_of.get(id(value))
        if known is not None:
            return known
        base, index = name, 1
        while name in self.constants or name in self.node_names:
            index += 1
            name = f"{base}#{index}"
        array = value.detach().cpu()
        if array.dtype == self.torch.bfloat16:  # NumPy has no bfloat16; float64 holds it exactly
            array = array.double()
        self.constants[name] = array.numpy()
        self.constant_of[id(value)] = name
        return name

    def _numpy_dtype(self, tensor: Any) -> np.dtype[Any]:
        """Return the dtype of constants read with ``tensor`` (its own; float64 for bfloat16)."""
        torch = self.torch
        if not isinstance(tensor, torch.Tensor) or tensor.dtype == torch.bfloat16:
            return np.dtype(np.float64)
        dtype: np.dtype[Any] = np.dtype(torch.empty((), dtype=tensor.dtype).numpy().dtype)
        return dtype

    def _number(self, value: float, reader: Any) -> str:
        """Return a Python number as a 0-d constant, rounded as PyTorch rounds it for ``reader``.

        PyTorch computes with a Python number in float32 for float32 and half-precision
        tensors; the constant has the tensor's dtype, so that the region keeps it.
        """
        out = self.values.get(reader.name)
        if isinstance(out, self.torch.Tensor) and out.dtype != self.torch.float64:
            value = float(np.float32(value))
        name, index = f"{reader.name}:number", 1
        while name in self.constants or name in self.node_names:
            index += 1
            name = f"{reader.name}:number#{index}"
        self.constants[name] = np.asarray(value, dtype=self._numpy_dtype(out))
        return name

    # ------------------------------------------------------------------ in-place writes

    def _mutated(self, n: Any) -> list[Any]:
        """Return the tensors ``n`` writes in place (its arguments), and version them."""
        torch = self.torch
        target, args, kwargs = n.target, n.args, n.kwargs
        written: list[Any] = []
        if n.op == "call_module":
            module = self.modules[target]
            if getattr(module, "inplace", False) is True and not isinstance(
                module, torch.nn.modules.dropout._DropoutNd
            ):
                written.append(args[0] if args else None)
        elif n.op == "call_method":
            if (
                isinstance(target, str)
                and target.endswith("_")
                and not target.startswith("_")
                and target not in _METADATA_INPLACE
            ):
                written.append(args[0] if args else None)
        elif n.op == "call_function":
            if target is operator.setitem or (
                getattr(target, "__module__", None) == "_operator"
                and getattr(target, "__name__", "").startswith("i")
                and target.__name__ not in ("index", "is_", "is_not", "indexOf", "inv", "invert")
            ):
                written.append(args[0] if args else None)
            elif isinstance(target, torch._ops.OpOverload):
                for i, a in enumerate(target._schema.arguments):
                    if a.alias_info is not None and a.alias_info.is_write:
                        written.append(args[i] if i < len(args) else kwargs.get(a.name))
            else:
                name = getattr(target, "__name__", "")
                if name.endswith("_") and not name.startswith("_"):
                    written.append(args[0] if args else None)
                elif "out" in kwargs:
                    written.append(kwargs["out"])
                else:
                    bound = _python_bind(target, args, kwargs)
                    if bound is not None and bound.get("inplace") is True:
                        if target not in _dropouts(torch):
                            written.append(next(iter(bound.values())))
        found = [w for w in written if _is_node(w)]
        for w in found:
            self._write(w, n)
        return found

    def _aliases(self, node: Any, writer: Any) -> list[str]:
        """Nodes before ``writer`` whose tensor shares ``node``'s storage (``node`` included)."""
        key = self.storage.get(node.name)
        before = self.position[writer.name]
        found = [node.name]
        if key is not None:
            found += [
                name
                for name, k in self.storage.items()
                if k == key and self.position[name] < before and name != node.name
            ]
        return found

    def _write(self, node: Any, writer: Any) -> None:
        """``writer`` writes ``node`` in place: every alias gets a new version."""
        aliases = self._aliases(node, writer)
        computed = writer.name in self.computed or any(
            a.name in self.computed for a in writer.all_input_nodes
        )
        if not computed:
            return  # a constant written from constants: its final value is read
        for alias in aliases:
            self.version[alias] = self.version.get(alias, 0) + 1
            self.mutations.setdefault(alias, []).append(self.position[writer.name])
            self.computed.add(alias)

    def _written_versions(self, n: Any) -> list[str]:
        """Return the new versions ``n`` produces (after :meth:`_mutated` bumped them)."""
        position = self.position[n.name]
        return [
            self._current(alias)
            for alias, writes in self.mutations.items()
            if writes and writes[-1] == position
        ]

    # ------------------------------------------------------------------ ops

    def _opaque(self, n: Any, mutated: list[Any]) -> list[Op]:
        reads = []
        for a in _flat_nodes((n.args, n.kwargs)):
            if a.name in self.computed and a.name != n.name:
                name = self._read(a, n)
                if a.name in self.static_computed or self.tensors[name][1] > 0:
                    reads.append(name)  # (a constant's version 0 is no IR tensor)
        outputs = [self._tensor(n.name), *self._written_versions(n)]
        return [
            Op(self._op_name(n), "opaque", tuple(dict.fromkeys(reads)), tuple(outputs),
               label=self._label(n))
        ]  # fmt: skip

    def _read(self, a: Any, reader: Any) -> str:
        """Return the name of the version of ``a`` that ``reader`` reads."""
        writes = self.mutations.get(a.name, [])
        at = self.position[reader.name]
        version = sum(1 for w in writes if w < at)
        return self._tensor(a.name, version)

    def _data(self, arg: Any, n: Any, out_node: Any = None) -> str | None:
        """Return the IR tensor an affine op reads, when it and the result are alike tensors.

        Alike: floating-point, one dtype and device, both NCHW images or both ``(N, C)``
        features. ``out_node`` holds the op's result when ``n`` itself does not (a tuple, a
        write).
        """
        torch = self.torch
        if not _is_node(arg) or arg.name not in self.computed:
            return None
        value = self.values.get(arg.name)
        out = self.values.get((n if out_node is None else out_node).name)
        if not isinstance(value, torch.Tensor) or not isinstance(out, torch.Tensor):
            return None
        if not value.is_floating_point() or value.dim() != out.dim() or value.dim() not in (2, 4):
            return None
        if value.dtype != out.dtype or value.device != out.device:
            return None
        return self._read(arg, n)

    def _affine(self, n: Any, mutated: list[Any]) -> list[Op] | None:
        if mutated:
            return self._canvas(n)
        for translate in (
            self._conv, self._linear, self._batch_norm, self._binary, self._unary, self._pad,
            self._pool, self._crop,
        ):  # fmt: skip
            ops = translate(n)
            if ops is not None:
                return ops
        return None

    def _emit(self, n: Any, kind: str, inputs: Sequence[str], attrs: dict[str, Any],
              label: str, output: str | None = None, suffix: str = "") -> Op:  # fmt: skip
        out = self._tensor(n.name) if output is None else output
        return Op(self._op_name(n, suffix), kind, tuple(inputs), (out,), attrs, label=label)

    # conv ---------------------------------------------------------------

    def _conv_args(self, n: Any) -> dict[str, Any] | None:
        torch = self.torch
        aten = torch.ops.aten
        if n.op == "call_module":
            module = self.modules[n.target]
            if type(module) is not torch.nn.Conv2d or module.padding_mode != "zeros":
                return None
            if len(n.args) != 1 or n.kwargs:
                return None
            return {
                "input": n.args[0], "weight": module.weight, "bias": module.bias,
                "stride": module.stride, "padding": module.padding,
                "dilation": module.dilation, "groups": module.groups,
                "weight_name": f"{n.target}.weight", "bias_name": f"{n.target}.bias",
            }  # fmt: skip
        if n.op != "call_function":
            return None
        if n.target is torch.conv2d:
            return _bind(_SIG_CONV, n.args, dict(n.kwargs))
        if n.target in (aten.conv2d.default, aten.conv2d.padding):
            return _bind_schema(n.target, n.args, dict(n.kwargs))
        if n.target is aten.convolution.default:
            bound = _bind_schema(n.target, n.args, dict(n.kwargs))
            if bound is None or bound["transposed"] or any(bound["output_padding"]):
                return None
            return bound
        return None

    def _conv(self, n: Any) -> list[Op] | None:
        bound = self._conv_args(n)
        if bound is None:
            return None
        weight = self._param(bound["weight"], n, bound.get("weight_name"))
        bias = (
            None if bound["bias"] is None else self._param(bound["bias"], n, bound.get("bias_name"))
        )
        if weight is None or (bound["bias"] is not None and bias is None):
            return None
        kernel = self.constants[weight].shape
        stride, dilation = _pair(bound["stride"]), _pair(bound["dilation"])
        groups = bound["groups"]
        if len(kernel) != 4 or stride is None or dilation is None or not isinstance(groups, int):
            return None
        padding = bound["padding"]
        if padding == "valid":
            pads: tuple[tuple[int, int], ...] = ((0, 0), (0, 0))
        elif padding == "same":
            totals = [d * (k - 1) for d, k in zip(dilation, kernel[2:], strict=True)]
            pads = tuple((t // 2, t - t // 2) for t in totals)
        else:
            pair = _pair(padding)
            if pair is None:
                return None
            pads = ((pair[0], pair[0]), (pair[1], pair[1]))
        nodes: tuple[str, ...] = ()
        x: str | None
        crop = self.pending_crops.get(n.name)
        merged = None if crop is None else _merge_crop(pads, crop[1])
        if crop is not None and merged is not None:
            del self.pending_crops[n.name]
            pads, x, nodes = merged, crop[2], (crop[0].name,)
        else:
            if crop is not None:  # a side both crops and pads: the crop stays an op
                del self.pending_crops[n.name]
                self._emit_crop_op(crop)
            x = self._data(bound["input"], n)
        if x is None:
            return None
        inputs = [x, weight] + ([bias] if bias is not None else [])
        attrs = {"stride": stride, "pads": pads, "groups": groups, "dilation": dilation}
        op = self._emit(n, "conv", inputs, attrs, self._label(n))
        self.extra[op.name] = nodes
        return [op]

    def _param(self, value: Any, n: Any, name: str | None) -> str | None:
        """Return the IR constant of a conv's or BatchNorm's parameter (tensor or node)."""
        torch = self.torch
        if isinstance(value, torch.Tensor):
            if not value.is_floating_point():
                return None
            return self._constant_array(name or f"{n.name}:param", value)
        return self._constant(value, n)

    # linear -------------------------------------------------------------

    def _linear(self, n: Any) -> list[Op] | None:
        """``nn.Linear``, ``F.linear``, ``aten.linear`` on ``(N, C)`` features."""
        torch = self.torch
        names: dict[str, str] = {}
        if n.op == "call_module":
            module = self.modules[n.target]
            if type(module) is not torch.nn.Linear or len(n.args) != 1 or n.kwargs:
                return None
            bound: dict[str, Any] | None = {
                "input": n.args[0], "weight": module.weight, "bias": module.bias,
            }  # fmt: skip
            names = {"weight": f"{n.target}.weight", "bias": f"{n.target}.bias"}
        elif n.op == "call_function" and n.target is torch.nn.functional.linear:
            bound = _bind(_SIG_LINEAR, n.args, dict(n.kwargs))
        elif n.op == "call_function" and n.target is torch.ops.aten.linear.default:
            bound = _bind_schema(n.target, n.args, dict(n.kwargs))
        else:
            return None
        if bound is None:
            return None
        weight = self._param(bound["weight"], n, names.get("weight"))
        bias = None if bound["bias"] is None else self._param(bound["bias"], n, names.get("bias"))
        if weight is None or (bound["bias"] is not None and bias is None):
            return None
        x = self._data(bound["input"], n)
        if x is None or self.constants[weight].ndim != 2:
            return None
        inputs = [x, weight] + ([bias] if bias is not None else [])
        return [self._emit(n, "linear", inputs, {}, self._label(n))]

    # crop ---------------------------------------------------------------

    def _crop(self, n: Any) -> list[Op] | None:
        """``x[:, :, a:h - b, c:w - d]`` read only by a conv: merged into the conv's padding."""
        if n.op != "call_function" or n.target is not operator.getitem or len(n.args) != 2:
            return None
        x, index = n.args
        amounts = self._crop_amounts(x, index)
        users = list(n.users)
        if amounts is None or len(users) != 1 or self._conv_args(users[0]) is None:
            return None
        source = self._data(x, n)
        if source is None or self._conv_args(users[0])["input"] is not n:  # type: ignore[index]
            return None
        self.pending_crops[users[0].name] = (n, amounts, source)
        return []

    def _emit_crop_op(self, crop: tuple[Any, tuple[int, int, int, int], str]) -> None:
        n, _, source = crop
        op = Op(self._op_name(n), "opaque", (source,), (self._tensor(n.name),),
                label="getitem")  # fmt: skip
        self._add(op, (n.name,))

    def _crop_amounts(self, x: Any, index: Any) -> tuple[int, int, int, int] | None:
        if not _is_node(x) or not isinstance(index, tuple):
            return None
        value = self.values.get(x.name)
        if not isinstance(value, self.torch.Tensor) or value.dim() != 4:
            return None
        entries = list(index)
        if entries and entries[0] is Ellipsis:
            entries = [slice(None)] * (4 - len(entries) + 1) + entries[1:]
        if len(entries) != 4 or not all(isinstance(e, slice) for e in entries):
            return None
        if any(e != slice(None) for e in entries[:2]):
            return None
        result: list[int] = []
        for axis, entry in ((2, entries[2]), (3, entries[3])):
            size = _Lin.axis(x.name, axis)
            sides = self._slice_sides(entry, size)
            if sides is None:
                return None
            result += sides
        if not any(result):
            return None
        return (result[0], result[1], result[2], result[3])

    def _slice_sides(self, entry: slice, size: _Lin) -> list[int] | None:
        """``(before, after)`` removed by ``entry`` on an axis of ``size``, if constant."""
        if entry.step not in (None, 1):
            return None
        start = _Lin.of(0) if entry.start is None else self._lin(entry.start)
        stop = size if entry.stop is None else self._lin(entry.stop)
        if start is None or stop is None:
            return None
        if start.constant is not None and start.constant < 0:
            start = size + start
        if stop.constant is not None and stop.constant < 0:
            stop = size + stop
        before, after = start.constant, (size - stop).constant
        if before is None or after is None or before < 0 or after < 0:
            return None
        return [before, after]

    # batch norm ---------------------------------------------------------

    def _batch_norm(self, n: Any) -> list[Op] | None:
        torch = self.torch
        aten = torch.ops.aten
        extra: tuple[str, ...] = ()
        output: str | None = None
        if n.op == "call_module":
            module = self.modules[n.target]
            if type(module) not in (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d):
                return None
            if len(n.args) != 1 or n.kwargs:
                return None
            if not module.track_running_stats or module.running_mean is None:
                return None
            prefix = str(n.target)
            bound: dict[str, Any] | None = {
                "input": n.args[0], "weight": module.weight, "bias": module.bias,
                "running_mean": module.running_mean, "running_var": module.running_var,
                "training": False, "eps": module.eps,
            }  # fmt: skip
            names = {k: f"{prefix}.{k}" for k in ("weight", "bias", "running_mean", "running_var")}
        elif n.op == "call_function":
            names = {}
            if n.target is torch.nn.functional.batch_norm:
                bound = _bind(_SIG_F_BN, n.args, dict(n.kwargs))
            elif n.target is torch.batch_norm:
                bound = _bind(_SIG_TORCH_BN, n.args, dict(n.kwargs))
            elif n.target is aten.batch_norm.default:
                bound = _bind_schema(n.target, n.args, dict(n.kwargs))
            elif n.target is aten._native_batch_norm_legit_no_training.default:
                bound = _bind_schema(n.target, n.args, dict(n.kwargs))
                users = list(n.users)
                if bound is None or len(users) != 1:
                    return None
                (user,) = users
                if user.target is not operator.getitem or user.args[1] != 0:
                    return None
                bound["training"] = False
                extra, output = (user.name,), user.name
            else:
                return None
        else:
            return None
        if bound is None or bound["training"] is not False:
            return None
        if isinstance(bound["eps"], bool) or not isinstance(bound["eps"], int | float):
            return None
        params = []
        for key in ("weight", "bias", "running_mean", "running_var"):
            value = bound[key]
            if value is None and key in ("weight", "bias"):
                mean = bound["running_mean"]
                channels = mean.numel() if isinstance(mean, torch.Tensor) else self._size_of(mean)
                if channels is None:
                    return None
                fill = 1.0 if key == "weight" else 0.0
                like = mean if isinstance(mean, torch.Tensor) else self.values.get(mean.name)
                params.append(self._filled(f"{n.name}:{key}", channels, fill, like))
                continue
            param = self._param(value, n, names.get(key))
            if param is None:
                return None
            params.append(param)
        if output is not None:
            x = self._data(bound["input"], n, self.by_name[output])
            out_name = self._tensor(output)
        else:
            x = self._data(bound["input"], n)
            out_name = None
        if x is None:
            return None
        op = self._emit(n, "batch_norm", [x, *params], {"eps": float(bound["eps"])},
                        self._label(n), output=out_name)  # fmt: skip
        self.extra[op.name] = extra
        return [op]

    def _size_of(self, arg: Any) -> int | None:
        value = self.values.get(arg.name) if _is_node(arg) else None
        return int(value.numel()) if isinstance(value, self.torch.Tensor) else None

    def _filled(self, name: str, channels: int, fill: float, like: Any) -> str:
        base, index = name, 1
        while name in self.constants or name in self.node_names:
            index += 1
            name = f"{base}#{index}"
        self.constants[name] = np.full(channels, fill, dtype=self._numpy_dtype(like))
        return name

    # binary and unary ---------------------------------------------------

    def _binary_args(self, n: Any) -> tuple[str, dict[str, Any]] | None:
        torch = self.torch
        aten = torch.ops.aten
        kinds = {"add": "add", "sub": "sub", "subtract": "sub", "mul": "mul", "multiply": "mul",
                 "div": "div", "divide": "div", "true_divide": "div"}  # fmt: skip
        operators = {operator.add: "add", operator.sub: "sub", operator.mul: "mul",
                     operator.truediv: "div"}  # fmt: skip
        if n.op == "call_function" and n.target in operators:
            if len(n.args) != 2 or n.kwargs:
                return None
            return operators[n.target], {"input": n.args[0], "other": n.args[1], "alpha": 1,
                                         "rounding_mode": None}  # fmt: skip
        if n.op == "call_method" and n.target in kinds:
            bound = _bind(_SIG_BINARY, n.args, dict(n.kwargs))
            return None if bound is None else (kinds[n.target], bound)
        if n.op == "call_function":
            name = getattr(n.target, "__name__", "")
            if name in kinds and n.target is getattr(torch, name, None):
                bound = _bind(_SIG_BINARY, n.args, dict(n.kwargs))
                return None if bound is None else (kinds[name], bound)
            if isinstance(n.target, torch._ops.OpOverload):
                packet = n.target.overloadpacket
                for kind in ("add", "sub", "mul", "div"):
                    op = getattr(aten, kind)
                    if packet is op and n.target._overloadname in ("Tensor", "Scalar"):
                        bound = _bind_schema(n.target, n.args, dict(n.kwargs))
                        if bound is None:
                            return None
                        bound["input"], bound["other"] = bound.pop("self"), bound["other"]
                        bound.setdefault("alpha", 1)
                        bound.setdefault("rounding_mode", None)
                        return kind, bound
        return None

    def _binary(self, n: Any) -> list[Op] | None:
        found = self._binary_args(n)
        if found is None:
            return None
        kind, bound = found
        if bound.get("rounding_mode") is not None:
            return None
        alpha = bound.get("alpha", 1)
        if isinstance(alpha, bool) or not isinstance(alpha, int | float):
            return None
        a, b = bound["input"], bound["other"]
        a_data, b_data = self._data(a, n), self._data(b, n)
        label = self._label(n)
        if a_data is not None and b_data is not None:
            if kind not in ("add", "sub"):
                return None
            ops: list[Op] = []
            if alpha != 1:
                scaled = f"{n.name}:alpha"
                self.tensors[scaled] = (n.name, -1)
                shape = self.shapes.get(b_data)
                if shape is not None:
                    self.shapes[scaled] = shape
                ops.append(self._emit(n, "mul", [b_data, self._number(float(alpha), n)], {},
                                      label, output=scaled, suffix=":alpha"))  # fmt: skip
                b_data = scaled
            ops.append(self._emit(n, kind, [a_data, b_data], {}, label))
            return ops
        if a_data is not None:
            const = self._constant(b, n)
            if const is None:
                return None
            if alpha != 1:
                const = self._scaled_constant(const, float(alpha), n)
            return [self._emit(n, kind, [a_data, const], {}, label)]
        if b_data is not None:
            const = self._constant(a, n)
            if const is None or kind == "div":
                return None
            ops = []
            if alpha != 1:
                scaled = f"{n.name}:alpha"
                self.tensors[scaled] = (n.name, -1)
                ops.append(self._emit(n, "mul", [b_data, self._number(float(alpha), n)], {},
                                      label, output=scaled, suffix=":alpha"))  # fmt: skip
                b_data = scaled
            ops.append(self._emit(n, kind, [const, b_data], {}, label))
            return ops
        return None

    def _scaled_constant(self, name: str, factor: float, n: Any) -> str:
        scaled, index = f"{n.name}:other", 1
        while scaled in self.constants:
            index += 1
            scaled = f"{n.name}:other#{index}"
        value = self.constants[name]
        self.constants[scaled] = (value * factor).astype(value.dtype)
        return scaled

    def _unary(self, n: Any) -> list[Op] | None:
        torch = self.torch
        aten = torch.ops.aten
        target = n.target
        kind: str | None = None
        if n.op == "call_module":
            module = self.modules[target]
            if type(module) is torch.nn.Identity or isinstance(
                module, torch.nn.modules.dropout._DropoutNd
            ):
                kind = "identity"
            if len(n.args) != 1 or n.kwargs:
                return None
        elif n.op == "call_function":
            if target in (operator.neg, torch.neg, torch.negative, aten.neg.default):
                kind = "neg" if len(n.args) == 1 and not n.kwargs else None
            elif target in _dropouts(torch):
                bound = _bind(_SIG_DROPOUT, n.args, dict(n.kwargs))
                kind = "identity" if bound is not None and bound["training"] is False else None
            elif target in (torch.clone, aten.clone.default, aten.alias.default):
                bound = _bind(_SIG_CLONE, n.args, dict(n.kwargs))
                kind = "identity" if bound is not None else None
            elif target is aten.dropout.default:
                bound = _bind_schema(target, n.args, dict(n.kwargs))
                kind = "identity" if bound is not None and bound["train"] is False else None
        elif n.op == "call_method":
            if target in ("neg", "negative") and len(n.args) == 1 and not n.kwargs:
                kind = "neg"
            elif target in ("clone", "contiguous") and len(n.args) == 1:
                kind = "identity"
        if kind is None:
            return None
        x = self._data(n.args[0], n)
        if x is None:
            return None
        return [self._emit(n, kind, [x], {}, self._label(n))]

    # pad and pool -------------------------------------------------------

    def _pad(self, n: Any) -> list[Op] | None:
        torch = self.torch
        aten = torch.ops.aten
        if n.op == "call_module":
            module = self.modules[n.target]
            if type(module) not in (torch.nn.ZeroPad2d, torch.nn.ConstantPad2d):
                return None
            if len(n.args) != 1 or n.kwargs:
                return None
            bound: dict[str, Any] | None = {
                "input": n.args[0], "pad": module.padding, "mode": "constant",
                "value": getattr(module, "value", 0.0),
            }  # fmt: skip
        elif n.op == "call_function" and n.target is torch.nn.functional.pad:
            bound = _bind(_SIG_PAD, n.args, dict(n.kwargs))
        elif n.op == "call_function" and n.target is aten.constant_pad_nd.default:
            bound = _bind_schema(n.target, n.args, dict(n.kwargs))
            if bound is not None:
                bound["input"], bound["mode"] = bound.pop("self"), "constant"
        else:
            return None
        if bound is None or bound["mode"] != "constant":
            return None
        pad, value = bound["pad"], bound["value"]
        if value is None:
            value = 0.0
        if isinstance(value, bool) or not isinstance(value, int | float) or not np.isfinite(value):
            return None
        if not isinstance(pad, tuple | list) or len(pad) not in (2, 4):
            return None
        if not all(isinstance(p, int) and not isinstance(p, bool) and p >= 0 for p in pad):
            return None
        left, right = pad[0], pad[1]
        top, bottom = (pad[2], pad[3]) if len(pad) == 4 else (0, 0)
        x = self._data(bound["input"], n)
        if x is None:
            return None
        attrs = {"pads": ((top, bottom), (left, right)), "value": float(value)}
        return [self._emit(n, "pad", [x], attrs, self._label(n))]

    def _pool(self, n: Any) -> list[Op] | None:
        torch = self.torch
        aten = torch.ops.aten
        if n.op == "call_module":
            module = self.modules[n.target]
            if type(module) is not torch.nn.AvgPool2d or len(n.args) != 1 or n.kwargs:
                return None
            bound: dict[str, Any] | None = {
                "input": n.args[0], "kernel_size": module.kernel_size, "stride": module.stride,
                "padding": module.padding, "ceil_mode": module.ceil_mode,
                "count_include_pad": module.count_include_pad,
                "divisor_override": module.divisor_override,
            }  # fmt: skip
        elif n.op == "call_function" and n.target is torch.nn.functional.avg_pool2d:
            bound = _bind(_SIG_POOL, n.args, dict(n.kwargs))
        elif n.op == "call_function" and n.target is aten.avg_pool2d.default:
            bound = _bind_schema(n.target, n.args, dict(n.kwargs))
            if bound is not None:
                bound["input"] = bound.pop("self")
        else:
            return None
        if bound is None or bound["ceil_mode"] or bound["divisor_override"] is not None:
            return None
        size = _pair(bound["kernel_size"])
        stride_value = bound["stride"]
        stride = size if stride_value is None or stride_value == [] else _pair(stride_value)
        padding = _pair(bound["padding"])
        if size is None or stride is None or padding is None:
            return None
        x = self._data(bound["input"], n)
        if x is None:
            return None
        attrs = {
            "size": size,
            "stride": stride,
            "pads": ((padding[0], padding[0]), (padding[1], padding[1])),
            "count_include_pad": bool(bound["count_include_pad"]),
        }
        return [self._emit(n, "avg_pool", [x], attrs, self._label(n))]

    # a constant canvas with a tensor written into it: a pad --------------

    def _canvas(self, n: Any) -> list[Op] | None:
        """``c = v.expand(n, c, h + t + b, w + l + r).clone(); c[:, :, t:t + h, l:l + w] = y``.

        A pad of ``y`` with the value ``v[c]`` on channel ``c``. The IR pads with one number,
        so it is written ``pad(y - (v - s), value=s) + (v - s)`` with one number ``s``
        (``max(1, max |v|)``): exactly the same map. Like Diverse Branch Block's own padding,
        it pads with a given value, which the fold compares with the previous map's output at
        zero input (computed here in float64; ``v`` was computed by the module in its dtype).
        """
        torch = self.torch
        if n.op != "call_function" or n.target is not operator.setitem or len(n.args) != 3:
            return None
        canvas, index, y = n.args
        if not _is_node(canvas) or not _is_node(y) or canvas.name in self.static_computed:
            return None
        fill = self._fill_of(canvas)
        if fill is None:
            return None
        value, sizes = fill
        y_value, c_value = self.values.get(y.name), self.values.get(canvas.name)
        if not isinstance(y_value, torch.Tensor) or not isinstance(c_value, torch.Tensor):
            return None
        if y_value.dim() != 4 or y_value.dtype != c_value.dtype or not y_value.is_floating_point():
            return None
        if len(sizes) != 4 or not isinstance(index, tuple):
            return None
        entries = list(index)
        if entries and entries[0] is Ellipsis:
            entries = [slice(None)] * (4 - len(entries) + 1) + entries[1:]
        if len(entries) != 4 or any(e != slice(None) for e in entries[:2]):
            return None
        if any(not isinstance(e, slice) for e in entries):
            return None
        channels = y_value.shape[1]
        if sizes[0] != _Lin.axis(y.name, 0) or (
            sizes[1] != _Lin.axis(y.name, 1) and sizes[1].constant != channels
        ):
            return None
        pads: list[tuple[int, int]] = []
        for axis in (2, 3):
            sides = self._slice_sides(entries[axis], sizes[axis])
            if sides is None:
                return None
            inner = sizes[axis] - _Lin.of(sides[0] + sides[1])
            if inner != _Lin.axis(y.name, axis):
                return None
            pads.append((sides[0], sides[1]))
        if [a for a in self._aliases(canvas, n) if a != canvas.name]:
            return None  # a view of the canvas would see the write too
        fill_name = self._constant(value, canvas)
        if fill_name is None:
            return None
        fill_array = self.constants[fill_name]
        if fill_array.size not in (1, channels) or fill_array.size != max(
            fill_array.shape, default=1
        ):
            return None
        x = self._data(y, n, canvas)
        if x is None:
            return None
        (new_version,) = [v for v in self._written_versions(n) if self.tensors[v][0] == canvas.name]
        label = "setitem"
        level = float(max(1.0, np.abs(fill_array).max()))
        offset = self._filled(f"{n.name}:offset", 1, 0.0, c_value)
        self.constants[offset] = (fill_array - level).astype(fill_array.dtype).reshape(1, -1, 1, 1)
        shifted, padded = f"{n.name}:shifted", f"{n.name}:padded"
        self.tensors[shifted] = self.tensors[padded] = (n.name, -1)
        if x in self.shapes:
            self.shapes[shifted] = self.shapes[x]
        self.shapes[padded] = self.shapes.get(new_version, _ir_shape(c_value))
        return [
            self._emit(n, "sub", [x, offset], {}, label, output=shifted, suffix=":shift"),
            self._emit(n, "pad", [shifted], {"pads": tuple(pads), "value": level}, label,
                       output=padded, suffix=":pad"),
            self._emit(n, "add", [padded, offset], {}, label, output=new_version),
        ]  # fmt: skip

    def _fill_of(self, canvas: Any) -> tuple[Any, tuple[_Lin, ...]] | None:
        """``(v, sizes)`` for a canvas ``v.expand(*sizes).clone()``."""
        torch = self.torch
        aten = torch.ops.aten
        clone = canvas
        is_clone = (clone.op == "call_method" and clone.target in ("clone", "contiguous")) or (
            clone.op == "call_function" and clone.target in (torch.clone, aten.clone.default)
        )
        if not is_clone or not clone.args or not _is_node(clone.args[0]):
            return None
        expand = clone.args[0]
        if expand.op == "call_method" and expand.target == "expand":
            sizes = expand.args[1:]
            if len(sizes) == 1 and isinstance(sizes[0], tuple | list):
                sizes = tuple(sizes[0])
        elif expand.op == "call_function" and expand.target is aten.expand.default:
            sizes = tuple(expand.args[1])
        else:
            return None
        lins = [self._lin(s) for s in sizes]
        if any(lin is None for lin in lins) or not expand.args or not _is_node(expand.args[0]):
            return None
        return expand.args[0], tuple(lin for lin in lins if lin is not None)


# --------------------------------------------------------------------------- helpers


def _is_node(value: Any) -> bool:
    return type(value).__name__ == "Node" and hasattr(value, "all_input_nodes")


def _flat_nodes(value: Any) -> Iterator[Any]:
    if _is_node(value):
        yield value
    elif isinstance(value, tuple | list):
        for item in value:
            yield from _flat_nodes(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _flat_nodes(item)
    elif isinstance(value, slice):
        yield from _flat_nodes((value.start, value.stop, value.step))


def _lin_dims(value: _Lin | tuple[_Lin, ...]) -> frozenset[_Dim]:
    if isinstance(value, _Lin):
        return value.dims
    return frozenset(d for lin in value for d in lin.dims)


def _storage_key(tensor: Any) -> int | None:
    try:
        storage = tensor.untyped_storage()
        return int(storage.data_ptr()) if storage.nbytes() > 0 else None
    except (RuntimeError, NotImplementedError):
        return None


def _ir_shape(tensor: Any) -> tuple[int | None, ...]:
    shape: tuple[int | None, ...] = tuple(int(s) for s in tensor.shape)
    return (None, *shape[1:]) if shape else shape


def _scope(n: Any) -> tuple[str, ...]:
    """Return the module paths ``n`` was called in, outermost first (not its own module)."""
    stack = n.meta.get("nn_module_stack") or {}
    paths = []
    for entry in stack.values():
        path = entry[0] if isinstance(entry, tuple) else str(entry)
        path = str(path)
        if path.startswith("L['self']"):
            path = path.removeprefix("L['self']").lstrip(".")
        if path:
            paths.append(path)
    if n.op == "call_module" and paths and paths[-1] == n.target:
        paths.pop()
    return tuple(paths)


def _merge_crop(
    pads: tuple[tuple[int, int], ...], crop: tuple[int, int, int, int]
) -> tuple[tuple[int, int], ...] | None:
    """Return a conv's padding after a crop of its input (None if a side crops and pads)."""
    sides = [pads[0][0], pads[0][1], pads[1][0], pads[1][1]]
    merged = []
    for pad, cut in zip(sides, crop, strict=True):
        if cut and pad:
            return None
        merged.append(pad - cut)
    return ((merged[0], merged[1]), (merged[2], merged[3]))


#: Functions and methods that draw random numbers: never constants, even without inputs.
_RANDOM = frozenset(
    {"rand", "randn", "randint", "randperm", "rand_like", "randn_like", "randint_like",
     "bernoulli", "normal", "multinomial", "poisson", "random_", "uniform_", "normal_",
     "bernoulli_", "exponential_", "geometric_", "log_normal_", "cauchy_"}
)  # fmt: skip


def _random(n: Any) -> bool:
    """Whether ``n`` draws random numbers (each call differs: not a constant)."""
    if n.op == "call_method":
        return str(n.target) in _RANDOM
    name = getattr(n.target, "__name__", "")
    packet = getattr(n.target, "overloadpacket", None)
    if packet is not None:
        name = getattr(packet, "__name__", name)
    return n.op == "call_function" and name in _RANDOM


def _python_bind(target: Any, args: Sequence[Any], kwargs: dict[str, Any]) -> dict[str, Any] | None:
    try:
        signature = inspect.signature(target)
        bound = signature.bind(*args, **kwargs)
    except (TypeError, ValueError):
        return None
    bound.apply_defaults()
    return dict(bound.arguments)


def _dropouts(torch: Any) -> tuple[Callable[..., Any], ...]:
    F = torch.nn.functional
    return (F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout,
            F.feature_alpha_dropout)  # fmt: skip


# --------------------------------------------------------------------------- rewrite plan


@dataclass
class _Region:
    folded: FoldedRegion
    members: list[str]  # fx nodes the region's ops stand for, in graph order
    source: tuple[str, int]  # (fx node, version) the new conv reads
    output: tuple[str, int]  # (fx node, version) it replaces
    rewire: list[str] = field(default_factory=list)  # fx nodes to read the new conv instead


@dataclass
class _Plan:
    regions: list[_Region] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)  # members, and what only they used
    atomic: set[str] = field(default_factory=set)  # fx nodes to translate as one opaque op
    pinned: set[str] = field(default_factory=set)  # fx nodes whose value is read outside


def _plan(gm: Any, built: _Built, report: FoldReport) -> _Plan:
    """Check that each folded region can be cut out of the traced graph; say where not.

    An fx node whose IR ops are not all in one region is translated as one opaque op
    next time (``atomic``); a member read by a node that stays (a shape read) is declared
    read outside next time (``pinned``).
    """
    plan = _Plan()
    nodes = {n.name: n for n in gm.graph.nodes}
    for folded in report.folded:
        replaced = set(folded.replaced)
        members: set[str] = set()
        for op in folded.replaced:
            members.update(built.op_nodes[op])
        for member in members:
            if any(op not in replaced for op in built.node_ops.get(member, [])):
                plan.atomic.add(member)
        source, output = built.tensors[folded.input], built.tensors[folded.output]
        ordered = sorted(members, key=built.position.__getitem__)
        plan.regions.append(_Region(folded, ordered, source, output))
    if plan.atomic:
        return plan
    for region in plan.regions:
        node, version = region.output
        writes = built.mutations.get(node, [])
        since = built.position[node] if version == 0 else writes[version - 1]
        for user in nodes[node].users:
            if user.name in region.members:
                continue
            if built.position[user.name] > since:
                region.rewire.append(user.name)
            else:  # reads the tensor before the region's write: it must stay
                plan.pinned.add(node)
    removed = {m for region in plan.regions for m in region.members}
    rewired = {(u, region.output[0]) for region in plan.regions for u in region.rewire}
    sources = {region.source[0] for region in plan.regions}
    _dead_closure(gm, removed, rewired, sources)
    for region in plan.regions:
        for member in region.members:
            for user in nodes[member].users:
                if user.name not in removed and (user.name, member) not in rewired:
                    plan.pinned.add(member)
    plan.removed = sorted(removed, key=built.position.__getitem__)
    return plan


def _dead_closure(
    gm: Any, removed: set[str], rewired: set[tuple[str, str]], keep: set[str]
) -> None:
    """Add to ``removed`` every node that only removed nodes read (in-place temporaries too)."""
    nodes = list(gm.graph.nodes)
    changed = True
    while changed:
        changed = False
        for n in reversed(nodes):
            if n.name in removed or n.name in keep or n.op in ("placeholder", "output"):
                continue
            users = [u for u in n.users if (u.name, n.name) not in rewired]
            live = [u for u in users if u.name not in removed]
            if not users:
                continue  # dead before the fold, or read only through the new conv
            if not live and _pure(n):
                removed.add(n.name)
                changed = True
            elif live and _fresh(n) and all(_writes_into(u, n) and not u.users for u in live):
                # a temporary filled in place (an identity kernel) that nothing kept reads
                removed.update(u.name for u in live)
                removed.add(n.name)
                changed = True


def _pure(n: Any) -> bool:
    """Whether dropping ``n`` changes nothing but its value (no write, no check)."""
    if n.op == "get_attr":
        return True
    if n.op not in ("call_function", "call_method"):
        return False
    name = str(n.target) if n.op == "call_method" else getattr(n.target, "__name__", "")
    if n.target is operator.setitem or name.endswith("_") or "assert" in name:
        return False
    if n.op == "call_function" and getattr(n.target, "_schema", None) is not None:
        if n.target._schema.is_mutable:
            return False
    return n.kwargs.get("inplace", False) is not True and "out" not in n.kwargs


def _writes_into(user: Any, n: Any) -> bool:
    """``user`` writes into ``n`` in place (``n[...] = v``, ``n.add_(v)``)."""
    if not user.args or user.args[0] is not n:
        return False
    if user.op == "call_function":
        return user.target is operator.setitem
    return user.op == "call_method" and str(user.target).endswith("_")


def _fresh(n: Any) -> bool:
    """``n`` makes a new tensor (not a view of a parameter or of an input)."""
    makers = {"zeros_like", "ones_like", "full_like", "empty_like", "zeros", "ones", "full",
              "empty", "clone", "new_zeros", "new_ones", "new_full", "new_empty"}  # fmt: skip
    name = str(n.target) if n.op == "call_method" else getattr(n.target, "__name__", "")
    return n.op in ("call_function", "call_method") and name in makers


# --------------------------------------------------------------------------- rewrite


def _apply(
    gm: Any,
    built: _Built,
    folded_graph: Graph,
    report: FoldReport,
    plan: _Plan,
    originals: set[int],
    torch: Any,
) -> FoldReport:
    """Put each region's conv into the traced graph, drop what it replaces, tidy the module."""
    graph = gm.graph
    nodes = {n.name: n for n in graph.nodes}
    replacement: dict[tuple[str, int], Any] = {}
    renamed: dict[int, FoldedRegion] = {}
    taken: set[str] = set()
    for region in sorted(plan.regions, key=lambda r: built.position[r.members[0]]):
        op = region.folded.conv
        like = built.values[region.output[0]]
        weight, bias = (folded_graph.constants[t] for t in op.inputs[1:3])
        if op.kind == "linear":
            layer, pads = _linear_module(weight, bias, like, torch), None
        else:
            layer, pads = _conv_module(op, weight, bias, like, torch)
        stem = "reparam_linear" if op.kind == "linear" else "reparam_conv"
        target = _target(region, built, gm, taken, originals, stem, torch)
        gm.add_submodule(target, layer)
        source = replacement.get(region.source, nodes[region.source[0]])
        with graph.inserting_before(nodes[region.members[0]]):
            if pads is not None:
                source = graph.call_function(torch.nn.functional.pad, (source, pads))
            new = graph.call_module(target, (source,))
        replacement[region.output] = new
        for user in region.rewire:
            nodes[user].replace_input_with(nodes[region.output[0]], new)
        renamed[id(region.folded)] = dataclasses.replace(
            region.folded, conv=dataclasses.replace(op, name=target)
        )
    for name in reversed(plan.removed):
        node = nodes[name]
        if node.users:  # pragma: no cover - the plan checked this
            raise ReparamError(f"{_FUNC}: {name!r} is still read after the rewrite; a bug")
        graph.erase_node(node)
    for node in list(graph.nodes):  # reads of parameters nothing uses (num_batches_tracked)
        if node.op == "get_attr" and not node.users:
            graph.erase_node(node)
    for node in graph.nodes:  # a string annotation (``from __future__ import annotations``)
        if isinstance(node.type, str):  # becomes a global torch.save cannot pickle
            node.type = None
    _prune(gm, originals)
    graph.lint()
    gm.recompile()
    for module in gm.modules():  # eval mode, as the module was (its own modules untouched)
        if id(module) not in originals:
            module.training = False
    return dataclasses.replace(report, folded=tuple(renamed.get(id(r), r) for r in report.folded))


def _target(
    region: _Region,
    built: _Built,
    gm: Any,
    taken: set[str],
    originals: set[int],
    stem: str,
    torch: Any,
) -> str:
    """Return ``<scope>.<stem>``, scope the deepest module every member was called in."""
    scopes = [built.scopes[m] for m in region.members]
    common: list[str] = []
    for level in zip(*scopes, strict=False):
        if len(set(level)) != 1:
            break
        common.append(level[0])
    scope = common[-1] if common else ""
    base = stem
    if scope:
        base = f"{scope}.{stem}"
        owner: Any = gm
        for part in scope.split("."):
            owner = getattr(owner, part, None)
            if owner is None:
                break
            if id(owner) in originals or not isinstance(owner, torch.nn.Module):
                base = f"{scope.replace('.', '_')}_{stem}"  # never add to the user's
                break
    name, index = base, 1
    while name in taken or _exists(gm, name):
        index += 1
        name = f"{base}_{index}"
    taken.add(name)
    return name


def _exists(gm: Any, path: str) -> bool:
    owner: Any = gm
    for part in path.split("."):
        if not hasattr(owner, part):
            return False
        owner = getattr(owner, part)
    return True


def _conv_module(
    op: Op, weight: _Array, bias: _Array, like: Any, torch: Any
) -> tuple[Any, tuple[int, int, int, int] | None]:
    """Return an ``nn.Conv2d`` holding ``weight`` and ``bias``, and the ``F.pad`` before it."""
    attrs = op.attrs
    (top, bottom), (left, right) = attrs["pads"]
    if top == bottom >= 0 and left == right >= 0:
        padding, pads = (top, left), None
    else:
        padding, pads = (0, 0), (left, right, top, bottom)
    groups = int(attrs["groups"])
    out_channels, per_group, kh, kw = weight.shape
    conv = torch.nn.Conv2d(
        per_group * groups,
        out_channels,
        (kh, kw),
        stride=tuple(attrs["stride"]),
        padding=padding,
        dilation=tuple(attrs["dilation"]),
        groups=groups,
        bias=True,
        device="meta",
        dtype=like.dtype,
    )
    conv.weight = torch.nn.Parameter(_to_torch(weight, like, torch))
    conv.bias = torch.nn.Parameter(_to_torch(bias, like, torch))
    return conv.train(False), pads


def _linear_module(weight: _Array, bias: _Array, like: Any, torch: Any) -> Any:
    """Return an ``nn.Linear`` holding ``weight`` (C_out, C_in) and ``bias``."""
    layer = torch.nn.Linear(
        weight.shape[1], weight.shape[0], bias=True, device="meta", dtype=like.dtype
    )
    layer.weight = torch.nn.Parameter(_to_torch(weight, like, torch))
    layer.bias = torch.nn.Parameter(_to_torch(bias, like, torch))
    return layer.train(False)


def _to_torch(array: _Array, like: Any, torch: Any) -> Any:
    """``array`` (float64) rounded once to ``like``'s dtype, on its device."""
    array = np.asarray(array, dtype=np.float64)
    if like.dtype == torch.bfloat16:
        tensor = torch.from_numpy(_round_bfloat16(array)).to(torch.bfloat16)
    else:
        numpy_dtype = torch.empty((), dtype=like.dtype).numpy().dtype
        tensor = torch.from_numpy(np.ascontiguousarray(array.astype(numpy_dtype)))
    return tensor.to(like.device)


def _round_bfloat16(array: _Array) -> npt.NDArray[np.float32]:
    """Round float64 to the nearest bfloat16 (ties to even), as float32 (exact).

    PyTorch converts float64 to bfloat16 through float32, rounding twice.
    """
    finite = np.isfinite(array) & (array != 0)
    _, exponent = np.frexp(np.where(finite, array, 1.0))
    # bfloat16 keeps 8 significant bits; below 2**-126 its spacing stays 2**-133
    step = np.ldexp(1.0, np.maximum(exponent - 8, -133))
    rounded = np.where(finite, np.rint(np.where(finite, array, 0.0) / step) * step, array)
    with np.errstate(over="ignore"):
        return rounded.astype(np.float32)


def _prune(gm: Any, originals: set[int]) -> None:
    """Drop the parameters, buffers and submodules no node of ``gm`` uses any more.

    Only ``gm``'s own containers are edited; a module of the user's is kept whole.
    """
    used = {str(n.target) for n in gm.graph.nodes if n.op in ("get_attr", "call_module")}

    def prune(module: Any, prefix: str) -> None:
        for name in list(module._parameters):
            if prefix + name not in used:
                del module._parameters[name]
        for name in list(module._buffers):
            if prefix + name not in used:
                del module._buffers[name]
                module._non_persistent_buffers_set.discard(name)
        for name, child in list(module._modules.items()):
            path = prefix + name
            if path in used:
                continue
            if child is not None and any(u.startswith(path + ".") for u in used):
                if id(child) not in originals:
                    prune(child, path + ".")
                continue
            del module._modules[name]

    prune(gm, "")
