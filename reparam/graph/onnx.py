"""The ONNX adapter: read a model into a :class:`~reparam.graph.ir.Graph`, fold it, write it back.

:func:`read_graph` translates each node of an ONNX model into an
:class:`~reparam.graph.ir.Op` (``Conv``, ``BatchNormalization``, ``Add``,
``Sub``, ``Mul``, ``Div``, ``Neg``, ``Pad``, ``AveragePool``, ``Identity`` and
inference ``Dropout`` to the affine kinds they are; anything else ``opaque``),
:func:`~reparam.graph.fold.fold_graph` decides what folds, and
:func:`write_graph` writes the result: every node that was not folded is the
original ``NodeProto``, unchanged, and each folded region is one new ``Conv``.
What folds is decided in :mod:`reparam.graph.fold` alone; this module only
translates.

Reading is careful with what a file declares. External data is read here, not
by ``onnx``'s loader: a ``location`` must name a file inside the model's
directory (``../../etc/passwd`` is refused and never opened), and a file
shorter than its tensor declares is refused. ``onnx`` is imported only when a
function here is called, so ``import reparam.graph`` works without it.
"""

from __future__ import annotations

import heapq
import math
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from pathlib import Path
from typing import IO, Any

import numpy as np
import numpy.typing as npt

from ..checkpoints.formats import shown, shown_path, write_atomic
from ..core.errors import ReparamError
from .fold import FoldReport, _fold_graph
from .ir import Graph, Op

__all__ = ["OnnxSource", "fold_onnx", "read_graph", "save_onnx", "write_graph"]

#: The oldest opset of the default domain read: the operators' current forms
#: (``Pad``'s pads as an input, ``Dropout``'s ``training_mode``) date from 13.
MIN_OPSET = 13

#: A serialized protobuf message cannot exceed 2 GiB; a model near that size is
#: saved with its larger initializers in a ``.data`` file next to it.
PROTOBUF_LIMIT = 2**31 - 1
#: Initializers of at least this many bytes go to the ``.data`` file then.
EXTERNAL_THRESHOLD = 1024
#: Headroom below :data:`PROTOBUF_LIMIT` for what the graph holds besides its tensors.
_HEADROOM = 2**24
#: Initializers of at least this many bytes are given to shape inference as inputs (their
#: shapes, not their data), so it never serializes the weights.
_INFERENCE_THRESHOLD = 2**16

_DEFAULT_DOMAINS = ("", "ai.onnx")
_AFFINE_TYPES = {"Add": "add", "Sub": "sub", "Mul": "mul", "Div": "div"}


@dataclass(frozen=True)
class OnnxSource:
    """What :func:`write_graph` needs to know of the model :func:`read_graph` read.

    Attributes
    ----------
    model : onnx.ModelProto
        The model as read, external data loaded into its initializers.
    name : str
        How messages name the model (its path, or ``"the model"``).
    ops : mapping of str to (Op, onnx.NodeProto)
        Each op of the graph read and the node it stands for.
    constant_nodes : mapping of str to onnx.NodeProto
        ``Constant`` nodes, and ``Identity`` nodes aliasing a constant, by the tensor they
        produce (they are constants of the graph, not ops).
    constants : mapping of str to ndarray
        The graph's constants (the graph's own mapping).
    names : frozenset of str
        The names of the constants as read: a new constant is one not among them.
    elem_types : mapping of str to int
        The ONNX element type of every tensor whose type is known.
    cleared : set of str
        Initializers whose data :func:`fold_onnx` left out of ``model`` (they are arrays in
        ``constants``; :func:`_write` writes back those the folded model still reads).
    """

    model: Any
    name: str
    ops: Mapping[str, tuple[Op, Any]]
    constant_nodes: Mapping[str, Any]
    constants: Mapping[str, npt.NDArray[Any]]
    elem_types: Mapping[str, int]
    names: frozenset[str] = frozenset()
    cleared: set[str] = dataclass_field(default_factory=set)


def _import_onnx(func: str) -> Any:
    try:
        import onnx
    except ImportError:
        raise ReparamError(
            f"{func}: the onnx package is not installed; expected it to read and write ONNX "
            'models (hint: pip install "reparam[onnx]")'
        ) from None
    return onnx


# --------------------------------------------------------------------------- loading


def _load(model: Any, func: str, onnx: Any) -> tuple[Any, str, Path | None]:
    """Return the ModelProto to read, how messages name it, and its external data's directory."""
    if isinstance(model, onnx.ModelProto):
        return model, "the model", None
    if not isinstance(model, str | os.PathLike):
        raise ReparamError(
            f"{func}: model must be an onnx.ModelProto or a path; got {type(model).__name__}"
        )
    name = shown_path(model)
    with open(model, "rb") as stream:
        data = stream.read()
    proto = onnx.ModelProto()
    try:
        proto.ParseFromString(data)
    except Exception as exc:  # protobuf's DecodeError, or whatever its backend raises
        raise ReparamError(
            f"{func}: {name} is not an ONNX model (cannot parse it: {shown(exc, 60)}); expected "
            "a complete .onnx file"
        ) from None
    if not proto.HasField("graph") or proto.ir_version <= 0 or not proto.graph.output:
        raise ReparamError(
            f"{func}: {name} is not an ONNX model (no graph, graph output or IR version); "
            "expected a complete .onnx file"
        )
    return proto, name, Path(os.path.realpath(model)).parent


def _opset(model: Any, name: str, func: str) -> int:
    versions = [o.version for o in model.opset_import if o.domain in _DEFAULT_DOMAINS]
    if not versions:
        raise ReparamError(f"{func}: {name} imports no opset of the default ONNX domain")
    opset = int(versions[0])
    if opset < MIN_OPSET:
        raise ReparamError(
            f"{func}: {name} uses opset {opset} of the default domain; expected {MIN_OPSET} or "
            f"newer (hint: onnx.version_converter.convert_version(model, {MIN_OPSET}))"
        )
    return opset


def _tensor_bytes(tensor: Any, onnx: Any) -> int | None:
    """Bytes a tensor's data takes, from its type and dims; None for an unknown type."""
    count = math.prod(int(d) for d in tensor.dims)
    bits = {
        getattr(onnx.TensorProto, name): width
        for name, width in (
            ("INT4", 4),
            ("UINT4", 4),
            ("FLOAT4E2M1", 4),
            ("INT2", 2),
            ("UINT2", 2),
            ("FLOAT6E2M3", 6),
            ("FLOAT6E3M2", 6),
        )
        if hasattr(onnx.TensorProto, name)
    }.get(tensor.data_type)
    if bits is not None:
        return (count * bits + 7) // 8
    if tensor.data_type == onnx.TensorProto.STRING:
        return None
    try:
        return count * int(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize)
    except (KeyError, TypeError, ValueError):
        return None


def _external_tensors(model: Any) -> Iterator[Any]:
    """Yield each tensor of the main graph that may keep its data outside (initializers, values)."""
    yield from model.graph.initializer
    for node in model.graph.node:
        for attribute in node.attribute:
            if attribute.HasField("t"):
                yield attribute.t


def _load_external(model: Any, directory: Path | None, name: str, func: str, onnx: Any) -> Any:
    """Return ``model`` with every external tensor's data read in, each location checked first.

    A location must be relative and inside ``directory`` (symlinks resolved); the file must
    hold the bytes the tensor declares. A model given without a directory cannot have any.
    """
    tensors = list(_external_tensors(model))
    external = [i for i, t in enumerate(tensors) if t.data_location == onnx.TensorProto.EXTERNAL]
    if not external:
        return model
    if directory is None:
        raise ReparamError(
            f"{func}: {name} keeps tensor {shown(tensors[external[0]].name)!r} in external "
            "data, and a ModelProto does not say where its file is; expected a path (hint: pass "
            "the .onnx file's path)"
        )
    plan = []
    for index in external:
        tensor = tensors[index]
        entries = {entry.key: entry.value for entry in tensor.external_data}
        location = entries.get("location", "")
        where = f"tensor {shown(tensor.name)!r} of {name}"
        target = Path(os.path.realpath(directory / location)) if location else directory
        if (
            not location
            or os.path.isabs(location)
            or Path(location).drive
            or not target.is_relative_to(directory)
            or target == directory
        ):
            raise ReparamError(
                f"{func}: {where} keeps its data in {shown(location)!r}, outside the model's "
                "directory; refused (expected a file next to the model)"
            )
        try:
            offset = int(entries.get("offset", "0"))
            length = int(entries["length"]) if "length" in entries else None
        except ValueError:
            raise ReparamError(
                f"{func}: {where} has an external offset or length that is not an integer; got "
                f"{shown(entries.get('offset'))!r} and {shown(entries.get('length'))!r}"
            ) from None
        expected = _tensor_bytes(tensor, onnx)
        if offset < 0 or (length is not None and length < 0):
            raise ReparamError(
                f"{func}: {where} has a negative external offset or length; got {offset}, {length}"
            )
        if expected is not None and length is not None and length != expected:
            raise ReparamError(
                f"{func}: {where} declares {length:,} bytes of external data; expected "
                f"{expected:,} for its shape {tuple(tensor.dims)}"
            )
        size = length if length is not None else expected
        plan.append((index, target, location, offset, size))
    loaded = onnx.ModelProto()
    loaded.CopyFrom(model)
    copies = list(_external_tensors(loaded))
    for index, target, location, offset, size in plan:
        with open(target, "rb") as stream:
            stream.seek(offset)
            data = stream.read() if size is None else stream.read(size)
        if size is not None and len(data) < size:
            raise ReparamError(
                f"{func}: {name}: external data {shown(location)!r} holds {len(data):,} bytes at "
                f"offset {offset:,} for tensor {shown(tensors[index].name)!r}; expected "
                f"{size:,} (the file is cut short)"
            )
        copy = copies[index]
        del copy.external_data[:]
        copy.data_location = onnx.TensorProto.DEFAULT
        copy.raw_data = data
    return loaded


# --------------------------------------------------------------------------- the DAG


def _subgraphs(node: Any) -> Iterator[Any]:
    for attribute in node.attribute:
        if attribute.HasField("g"):
            yield attribute.g
        yield from attribute.graphs


def _outer_names(graph: Any) -> set[str]:
    """Tensors a subgraph reads from the scopes around it."""
    defined = {i.name for i in graph.input} | {i.name for i in graph.initializer}
    defined |= {i.values.name for i in graph.sparse_initializer}
    defined |= {o for node in graph.node for o in node.output}
    used: set[str] = set()
    for node in graph.node:
        used.update(i for i in node.input if i)
        for sub in _subgraphs(node):
            used |= _outer_names(sub)
    return used - defined


def _reads(node: Any) -> list[str]:
    """Every tensor a node reads: its inputs, then what its subgraphs read from outside."""
    reads = list(dict.fromkeys(i for i in node.input if i))
    for sub in _subgraphs(node):
        reads += sorted(_outer_names(sub) - set(reads))
    return reads


def _node_names(nodes: list[Any]) -> list[str]:
    """Return a unique name per node: its own when unique and non-empty, else ``OpType_index``."""
    counts: dict[str, int] = {}
    for node in nodes:
        counts[node.name] = counts.get(node.name, 0) + 1
    taken = {node.name for node in nodes if node.name and counts[node.name] == 1}
    names = []
    for index, node in enumerate(nodes):
        if node.name and counts[node.name] == 1:
            names.append(node.name)
            continue
        base = f"{node.op_type or 'node'}_{index}"
        candidate, suffix = base, 1
        while candidate in taken:
            suffix += 1
            candidate = f"{base}_{suffix}"
        taken.add(candidate)
        names.append(candidate)
    return names


def _sorted_nodes(
    nodes: list[Any], names: list[str], known: set[str], where: str, func: str
) -> list[int]:
    """Node indices in topological order (stable); refuses unknown tensors, doubles, cycles."""
    producer: dict[str, int] = {}
    for index, node in enumerate(nodes):
        for tensor in node.output:
            if not tensor:
                continue
            if tensor in producer or tensor in known:
                first = (
                    f"node {names[producer[tensor]]!r}"
                    if tensor in producer
                    else "a graph input or initializer"
                )
                raise ReparamError(
                    f"{func}: {where}: tensor {shown(tensor)!r} is produced twice, by {first} and "
                    f"by node {shown(names[index])!r} ({node.op_type})"
                )
            producer[tensor] = index
    needs: list[set[int]] = []
    for index, node in enumerate(nodes):
        need = set()
        for tensor in _reads(node):
            if tensor in producer:
                need.add(producer[tensor])
            elif tensor not in known:
                raise ReparamError(
                    f"{func}: {where}: node {shown(names[index])!r} ({node.op_type}) reads "
                    f"tensor {shown(tensor)!r}, which no node, graph input or initializer "
                    "produces"
                )
        needs.append(need)
    readers: dict[int, list[int]] = {}
    for index, need in enumerate(needs):
        for other in need:
            readers.setdefault(other, []).append(index)
    waiting = [len(need) for need in needs]
    ready = [index for index, count in enumerate(waiting) if count == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        index = heapq.heappop(ready)
        order.append(index)
        for reader in readers.get(index, []):
            waiting[reader] -= 1
            if waiting[reader] == 0:
                heapq.heappush(ready, reader)
    if len(order) != len(nodes):
        stuck = sorted(set(range(len(nodes))) - set(order))
        shown_nodes = ", ".join(repr(shown(names[i])) for i in stuck[:3])
        more = f" and {len(stuck) - 3} more" if len(stuck) > 3 else ""
        raise ReparamError(
            f"{func}: {where}: the graph has a cycle through nodes {shown_nodes}{more}; "
            "expected a DAG"
        )
    return order


# --------------------------------------------------------------------------- constants


def _to_array(tensor: Any, where: str, func: str, onnx: Any) -> npt.NDArray[Any]:
    """Return a TensorProto as an array; bfloat16 widened exactly to float64 (see _widened)."""
    try:
        array = np.asarray(onnx.numpy_helper.to_array(tensor))
    except Exception as exc:  # a tensor whose data does not fit its dims or type
        raise ReparamError(
            f"{func}: {where}: tensor {shown(tensor.name)!r} cannot be read "
            f"({type(exc).__name__}: {shown(exc, 60)}); expected data matching its shape "
            f"{tuple(tensor.dims)}"
        ) from None
    if tensor.data_type == onnx.TensorProto.BFLOAT16:
        array = array.astype(np.float64)
    return array


def _constant_value(node: Any, where: str, func: str, onnx: Any) -> npt.NDArray[Any] | None:
    """Return the value of a ``Constant`` node, or None for one that is not a plain tensor."""
    if len(node.attribute) != 1:
        return None
    attribute = node.attribute[0]
    if attribute.name == "value":
        return _to_array(attribute.t, where, func, onnx)
    values: dict[str, Any] = {
        "value_float": lambda a: np.asarray(a.f, np.float32),
        "value_floats": lambda a: np.asarray(list(a.floats), np.float32),
        "value_int": lambda a: np.asarray(a.i, np.int64),
        "value_ints": lambda a: np.asarray(list(a.ints), np.int64),
    }
    convert = values.get(attribute.name)
    return None if convert is None else np.asarray(convert(attribute))


def _elem_types(
    model: Any, inferred: Any
) -> tuple[dict[str, int], dict[str, tuple[int | None, ...]]]:
    """Element types and shapes of the tensors that shape inference knows."""
    types: dict[str, int] = {t.name: int(t.data_type) for t in model.graph.initializer}
    shapes: dict[str, tuple[int | None, ...]] = {}
    graph = inferred.graph
    for info in [*graph.input, *graph.value_info, *graph.output]:
        if not info.type.HasField("tensor_type"):
            continue
        tensor_type = info.type.tensor_type
        if tensor_type.elem_type:
            types.setdefault(info.name, int(tensor_type.elem_type))
        if tensor_type.HasField("shape"):
            shapes[info.name] = tuple(
                int(d.dim_value) if d.HasField("dim_value") else None for d in tensor_type.shape.dim
            )
    return types, shapes


def _inference_model(model: Any, onnx: Any) -> Any:
    """Return a copy to infer shapes on: large initializers become typed inputs (no data)."""
    copy = onnx.ModelProto()
    for field, value in model.ListFields():
        if field.name != "graph":
            _set_field(copy, field, value)
    for field, value in model.graph.ListFields():
        if field.name not in ("initializer", "input"):
            _set_field(copy.graph, field, value)
    names = {i.name for i in model.graph.input}
    copy.graph.input.extend(model.graph.input)
    for tensor in model.graph.initializer:
        if _stored_bytes(tensor) < _INFERENCE_THRESHOLD:
            copy.graph.initializer.append(tensor)
        elif tensor.name not in names:
            copy.graph.input.append(
                onnx.helper.make_tensor_value_info(tensor.name, tensor.data_type, tensor.dims)
            )
    return copy


def _stored_bytes(tensor: Any) -> int:
    """Return about how many bytes a TensorProto holds (ByteSize() would serialize it)."""
    if tensor.HasField("raw_data"):
        return len(tensor.raw_data)
    count = math.prod(int(d) for d in tensor.dims)
    return 8 * count  # typed fields: at most 8 bytes an element


def _set_field(target: Any, field: Any, value: Any) -> None:
    """Copy one protobuf field (as ``ListFields`` gives it) into ``target``."""
    repeated = getattr(field, "is_repeated", None)  # protobuf >= 6; ``label`` before
    if repeated is None:
        repeated = field.label == field.LABEL_REPEATED
    if repeated:
        getattr(target, field.name).extend(value)
    elif field.type == field.TYPE_MESSAGE:
        getattr(target, field.name).CopyFrom(value)
    else:
        setattr(target, field.name, value)


# --------------------------------------------------------------------------- computed parameters

#: Operands that are parameters when constant: (op type, first index, end index).
_PARAMETER_OPERANDS = {
    "Conv": (1, 3),
    "BatchNormalization": (1, 5),
    "Pad": (1, 4),
    "Dropout": (1, 3),
    "Add": (0, 2),
    "Sub": (0, 2),
    "Mul": (0, 2),
    "Div": (0, 2),
}
#: Operators whose result is not a function of their inputs.
_RANDOM = frozenset(
    {
        "RandomNormal",
        "RandomNormalLike",
        "RandomUniform",
        "RandomUniformLike",
        "Bernoulli",
        "Multinomial",
    }
)
#: Largest parameter (in elements) computed from constants; larger ones stay as they are.
_MAX_EVALUATED = 2**24


def _evaluate_parameters(
    model: Any, nodes: list[Any], order: list[int], shapes: Mapping[str, Any], onnx: Any
) -> dict[int, dict[str, npt.NDArray[Any]]]:
    """Compute the parameters an exporter left as computations on constants.

    The TorchScript exporter does not fold every computation on constants: ``F.pad``'s pads
    arrive as ``ConstantOfShape``, ``Slice``, ``Transpose``, ``Cast`` of constants, and a
    weight built in ``forward`` (Diverse Branch Block's identity-based 1x1 conv) as a
    ``ScatterND`` and an ``Add``. Where such a tensor is the parameter of a node this adapter
    translates (a Conv's weight, a Pad's pads, ...), it is computed here with ONNX's reference
    evaluator, and the nodes that compute it become constants of the graph, as ``Constant``
    nodes are. Nodes of another domain, random ones and ones with subgraphs are never run.

    Returns
    -------
    dict of int to dict of str to ndarray
        For each node computed, by its index in ``nodes``, its outputs' values.
    """
    initializers = {t.name for t in model.graph.initializer}
    constant: dict[str, int] = {}  # tensor -> index of the node computing it from constants
    for index in order:
        node = nodes[index]
        if (
            node.domain not in _DEFAULT_DOMAINS
            or node.op_type in _RANDOM
            or any(True for _ in _subgraphs(node))
            or (not node.input and node.op_type != "Constant")
        ):
            continue
        if all(not t or t in initializers or t in constant for t in node.input):
            constant.update((t, index) for t in node.output if t)
    wanted: list[str] = []
    for index in order:
        node = nodes[index]
        span = _PARAMETER_OPERANDS.get(node.op_type)
        if span is None or node.domain not in _DEFAULT_DOMAINS or node.output[0] in constant:
            continue
        wanted += [t for t in node.input[span[0] : span[1]] if t in constant]
    chosen: set[int] = set()
    for tensor in dict.fromkeys(wanted):
        closure: set[int] = set()
        pending = [constant[tensor]]
        while pending:
            index = pending.pop()
            if index not in closure:
                closure.add(index)
                pending += [constant[t] for t in nodes[index].input if t in constant]
        sizes = [shapes.get(t) for i in closure for t in nodes[i].output]
        if any(
            s is not None and all(d is not None for d in s) and math.prod(s) > _MAX_EVALUATED
            for s in sizes
        ):
            continue
        if all(nodes[i].op_type in ("Constant", "Identity") for i in closure):
            continue  # read_graph takes these as they are
        chosen |= closure
    if not chosen:
        return {}
    ordered = [i for i in order if i in chosen]
    outputs = [t for i in ordered for t in nodes[i].output if t]
    reads = {t for i in ordered for t in nodes[i].input}
    graph = onnx.helper.make_graph(
        [nodes[i] for i in ordered],
        "parameters",
        [],
        [onnx.helper.make_empty_tensor_value_info(t) for t in outputs],
        initializer=[t for t in model.graph.initializer if t.name in reads],
    )
    evaluator_model = onnx.helper.make_model(graph, opset_imports=list(model.opset_import))
    evaluator_model.ir_version = model.ir_version
    try:
        from onnx.reference import ReferenceEvaluator

        values = ReferenceEvaluator(evaluator_model).run(None, {})
    except Exception:  # an operator the reference lacks, or a failure: leave them as they are
        return {}
    found = dict(zip(outputs, values, strict=True))
    result: dict[int, dict[str, npt.NDArray[Any]]] = {}
    for index in ordered:
        result[index] = {t: _widened(np.asarray(found[t])) for t in nodes[index].output if t}
    return result


def _widened(array: npt.NDArray[Any]) -> npt.NDArray[Any]:
    """bfloat16 (ml_dtypes) widened exactly to float64; any other array as it is.

    float64, not float32: a fold of bfloat16 parameters then stays in float64 until
    :func:`_bfloat16_bits` rounds it, once, to bfloat16.
    """
    return array.astype(np.float64) if array.dtype.name == "bfloat16" else array


# --------------------------------------------------------------------------- nodes to ops


_FLOATS = frozenset({1, 10, 11, 16})  # FLOAT, FLOAT16, DOUBLE, BFLOAT16


class _Translator:
    """Turns each node into an op, given the constants and what shape inference found."""

    def __init__(
        self,
        constants: dict[str, npt.NDArray[Any]],
        shapes: Mapping[str, tuple[int | None, ...]],
        types: Mapping[str, int],
        used: set[str],
        onnx: Any,
    ) -> None:
        self.constants = constants
        self.shapes = shapes
        self.types = types
        self.used = used  # tensors some node reads, or graph outputs
        self.onnx = onnx

    def computed(self, tensor: str) -> bool:
        return bool(tensor) and tensor not in self.constants

    def floating(self, tensor: str) -> bool:
        """Whether ``tensor`` is computed and of a floating (or unknown) type."""
        kind = self.types.get(tensor)
        return self.computed(tensor) and (kind is None or kind in _FLOATS)

    def attrs(self, node: Any) -> dict[str, Any]:
        return {a.name: self.onnx.helper.get_attribute_value(a) for a in node.attribute}

    def op(self, node: Any, name: str) -> Op:
        outputs = tuple(o for o in node.output if o)
        opaque = Op(name, "opaque", tuple(_reads(node)), outputs, {}, node.op_type)
        if node.domain not in _DEFAULT_DOMAINS or any(True for _ in _subgraphs(node)):
            return opaque
        try:
            found = self.affine(node, self.attrs(node))
        except (ValueError, TypeError, IndexError, KeyError):  # malformed attributes: not ours
            found = None
        if found is None:
            return opaque
        kind, operands, attrs = found
        return Op(name, kind, operands, outputs[:1], attrs, node.op_type)

    def affine(
        self, node: Any, attrs: dict[str, Any]
    ) -> tuple[str, tuple[str, ...], dict[str, Any]] | None:
        inputs = [*node.input]
        outputs = [o for o in node.output if o]
        op_type = node.op_type
        if op_type in _AFFINE_TYPES:
            if len(inputs) != 2 or len(outputs) != 1:
                return None
            a, b = inputs
            computed = [t for t in (a, b) if self.computed(t)]
            if not computed or not all(self.floating(t) for t in computed):
                return None
            if op_type in ("Mul", "Div") and len(computed) != 1:
                return None
            if op_type == "Div" and not self.computed(a):
                return None  # a constant divided by a tensor is not affine
            return _AFFINE_TYPES[op_type], (a, b), {}
        # every other kind reads one computed tensor first, and only constants besides
        if not inputs or not self.floating(inputs[0]) or len(outputs) != 1:
            return None
        if op_type == "Conv":
            return self.conv(inputs, attrs)
        if op_type in ("Gemm", "MatMul"):
            return self.linear(op_type, inputs, attrs)
        if op_type == "BatchNormalization":
            if (
                len(inputs) != 5
                or int(attrs.get("training_mode", 0)) != 0
                or not all(p in self.constants for p in inputs[1:])
            ):
                return None
            return "batch_norm", tuple(inputs), {"eps": float(attrs.get("epsilon", 1e-5))}
        if op_type == "Neg":
            return "neg", (inputs[0],), {}
        if op_type == "Identity":
            return "identity", (inputs[0],), {}
        if op_type == "Dropout":
            ratio, training = [*inputs, "", ""][1:3]
            if ratio and ratio not in self.constants:
                return None
            if training and (
                training not in self.constants or bool(np.any(self.constants[training]))
            ):
                return None
            if len(node.output) > 1 and node.output[1] and node.output[1] in self.used:
                return None  # its mask is read
            return "identity", (inputs[0],), {}
        if op_type == "Pad":
            return self.pad(inputs, attrs)
        if op_type == "AveragePool":
            return self.avg_pool(inputs, attrs)
        return None

    def linear(
        self, op_type: str, inputs: list[str], attrs: dict[str, Any]
    ) -> tuple[str, tuple[str, ...], dict[str, Any]] | None:
        """Read a fully connected layer on ``(N, C)`` features: ``x W^T + b``, W and b constant."""
        if len(inputs) < 2 or inputs[1] not in self.constants:
            return None
        shape = self.shapes.get(inputs[0])
        if shape is not None and len(shape) != 2:
            return None  # MatMul on more axes (attention, tokens) is not a channel map
        weight = self.constants[inputs[1]]
        bias = inputs[2] if len(inputs) > 2 else ""
        if weight.ndim != 2:
            return None
        if op_type == "MatMul":
            transposed = False
        elif (
            int(attrs.get("transA", 0)) != 0
            or float(attrs.get("alpha", 1.0)) != 1.0
            or float(attrs.get("beta", 1.0)) != 1.0
        ):
            return None
        else:
            transposed = int(attrs.get("transB", 0)) == 1
        if bias and (bias not in self.constants or self.constants[bias].ndim != 1):
            return None
        matrix = inputs[1]
        if not transposed:  # the IR holds (C_out, C_in): name the transposed weight
            matrix = f"{inputs[1]}::T"
            while matrix in self.constants or matrix in self.shapes or matrix in self.used:
                matrix += "'"
            self.constants[matrix] = np.ascontiguousarray(weight.T)
        return "linear", (inputs[0], matrix) + ((bias,) if bias else ()), {}

    def spatial(self, tensor: str) -> tuple[int, int] | None:
        shape = self.shapes.get(tensor)
        if shape is None or len(shape) != 4 or shape[2] is None or shape[3] is None:
            return None
        return int(shape[2]), int(shape[3])

    def conv(
        self, inputs: list[str], attrs: dict[str, Any]
    ) -> tuple[str, tuple[str, ...], dict[str, Any]] | None:
        if len(inputs) < 2 or inputs[1] not in self.constants:
            return None
        weight = self.constants[inputs[1]]
        bias = inputs[2] if len(inputs) > 2 else ""
        if weight.ndim != 4 or (bias and bias not in self.constants):
            return None
        kernel = tuple(int(k) for k in weight.shape[2:])
        if tuple(attrs.get("kernel_shape", kernel)) != kernel:
            return None
        stride = tuple(int(s) for s in attrs.get("strides", (1, 1)))
        dilation = tuple(int(d) for d in attrs.get("dilations", (1, 1)))
        auto_pad = _text(attrs.get("auto_pad", "NOTSET"))
        if len(stride) != 2 or len(dilation) != 2 or min(stride + dilation) < 1:
            return None
        if auto_pad == "NOTSET":
            pads = [int(p) for p in attrs.get("pads", (0, 0, 0, 0))]
        elif auto_pad == "VALID":
            pads = [0, 0, 0, 0]
        elif auto_pad in ("SAME_UPPER", "SAME_LOWER"):
            size = self.spatial(inputs[0])
            if size is None:
                return None
            pads = _same_pads(size, kernel, stride, dilation, upper=auto_pad == "SAME_UPPER")
        else:
            return None
        if len(pads) != 4 or min(pads) < 0:
            return None
        operands = (inputs[0], inputs[1]) + ((bias,) if bias else ())
        return (
            "conv",
            operands,
            {
                "stride": stride,
                "pads": ((pads[0], pads[2]), (pads[1], pads[3])),
                "groups": int(attrs.get("group", 1)),
                "dilation": dilation,
            },
        )

    def pad(
        self, inputs: list[str], attrs: dict[str, Any]
    ) -> tuple[str, tuple[str, ...], dict[str, Any]] | None:
        if _text(attrs.get("mode", "constant")) != "constant" or len(inputs) < 2:
            return None
        pads_name = inputs[1]
        value_name = inputs[2] if len(inputs) > 2 else ""
        axes_name = inputs[3] if len(inputs) > 3 else ""
        if pads_name not in self.constants:
            return None
        if any(n and n not in self.constants for n in (value_name, axes_name)):
            return None
        pads = [int(p) for p in np.asarray(self.constants[pads_name]).reshape(-1)]
        shape = self.shapes.get(inputs[0])
        rank = len(shape) if shape is not None else None
        if axes_name:
            axes = [int(a) for a in np.asarray(self.constants[axes_name]).reshape(-1)]
            if rank is None and any(a < 0 for a in axes):
                return None
            axes = [a + rank if a < 0 and rank is not None else a for a in axes]
        else:
            if len(pads) % 2:
                return None
            axes = list(range(len(pads) // 2))
            rank = rank if rank is not None else len(axes)
        if len(pads) != 2 * len(axes) or len(set(axes)) != len(axes) or rank != 4:
            return None
        per_axis = {axis: (pads[i], pads[i + len(axes)]) for i, axis in enumerate(axes)}
        if any(per_axis.get(axis, (0, 0)) != (0, 0) for axis in (0, 1)):
            return None
        if any(min(pair) < 0 for pair in per_axis.values()) or not set(per_axis) <= {0, 1, 2, 3}:
            return None
        value = 0.0
        if value_name:
            array = np.asarray(self.constants[value_name])
            if array.size != 1:
                return None
            value = float(array.reshape(-1)[0])
        spatial = (per_axis.get(2, (0, 0)), per_axis.get(3, (0, 0)))
        return "pad", (inputs[0],), {"pads": spatial, "value": value}

    def avg_pool(
        self, inputs: list[str], attrs: dict[str, Any]
    ) -> tuple[str, tuple[str, ...], dict[str, Any]] | None:
        size = tuple(int(k) for k in attrs.get("kernel_shape", ()))
        stride = tuple(int(s) for s in attrs.get("strides", (1,) * len(size)))
        auto_pad = _text(attrs.get("auto_pad", "NOTSET"))
        pads = [int(p) for p in attrs.get("pads", (0,) * (2 * len(size)))]
        if auto_pad == "VALID":
            pads = [0] * (2 * len(size))
        if (
            len(size) != 2
            or len(stride) != 2
            or len(pads) != 4
            or min(pads) < 0
            or min(size + stride) < 1
            or auto_pad not in ("NOTSET", "VALID")
            or int(attrs.get("ceil_mode", 0)) != 0
            or any(int(d) != 1 for d in attrs.get("dilations", ()))
        ):
            return None
        return (
            "avg_pool",
            (inputs[0],),
            {
                "size": size,
                "stride": stride,
                "pads": ((pads[0], pads[2]), (pads[1], pads[3])),
                "count_include_pad": bool(int(attrs.get("count_include_pad", 0))),
            },
        )


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _same_pads(
    size: tuple[int, int],
    kernel: tuple[int, ...],
    stride: tuple[int, ...],
    dilation: tuple[int, ...],
    *,
    upper: bool,
) -> list[int]:
    """ONNX ``auto_pad`` SAME_UPPER / SAME_LOWER as explicit ``[top, left, bottom, right]``."""
    begins, ends = [], []
    for n, k, s, d in zip(size, kernel, stride, dilation, strict=True):
        out = -(-n // s)
        total = max(0, (out - 1) * s + (k - 1) * d + 1 - n)
        small, large = total // 2, total - total // 2
        begins.append(small if upper else large)
        ends.append(large if upper else small)
    return begins + ends


# --------------------------------------------------------------------------- read


def read_graph(model: Any, *, func: str = "read_graph") -> tuple[Graph, OnnxSource]:
    """Read an ONNX model into a :class:`~reparam.graph.ir.Graph`.

    Parameters
    ----------
    model : onnx.ModelProto or str or path-like
        The model, or the path of an ``.onnx`` file (its external data, if
        any, in files next to it).
    func : str, default "read_graph"
        The name errors start with.

    Returns
    -------
    graph : Graph
        One op per node (except ``Constant`` nodes and ``Identity`` nodes of a
        constant, which are constants), in topological order, named after
        their nodes (``OpType_index`` where a name is empty or repeated).
        Initializers and constants in :attr:`Graph.constants` (bfloat16
        widened exactly to float32), shapes from ONNX shape inference.
    source : OnnxSource
        What :func:`write_graph` needs to write a folded graph back.

    Raises
    ------
    ReparamError
        One line naming the model: a file that is not an ONNX model or is cut
        short; an opset of the default domain older than 13; a node reading a
        tensor nothing produces, a tensor produced twice, a cycle; external
        data outside the model's directory or shorter than its tensor; a
        sparse initializer.
    OSError
        If the file or its external data cannot be read.

    Notes
    -----
    ``Conv`` (2-D, constant weight and bias; ``auto_pad`` SAME_* only where
    the input's size is known), ``BatchNormalization`` (inference, constant
    parameters), ``Add``/``Sub`` (of two tensors or a tensor and a constant),
    ``Mul`` and ``Div`` (a tensor and a constant; a constant divided by a
    tensor is not affine), ``Neg``, ``Pad`` (constant mode, the two spatial
    axes), ``AveragePool`` (2-D, no ``ceil_mode``, no dilation), ``Identity``
    and inference ``Dropout`` become their kinds; every other node is
    ``opaque`` and reads what its subgraphs read too.
    """
    return _read_graph(model, func=func, owned=False)


def _read_graph(model: Any, *, func: str, owned: bool) -> tuple[Graph, OnnxSource]:
    """:func:`read_graph`; ``owned``: the model was read from a file and is ours to rebuild.

    An owned model is rebuilt without the data of its large initializers once they are
    arrays (protobuf frees a message's memory only with the whole message): the weights are
    then held once, as arrays, not twice.
    """
    onnx = _import_onnx(func)
    proto, name, directory = _load(model, func, onnx)
    _opset(proto, name, func)
    if len(proto.graph.sparse_initializer):
        raise ReparamError(
            f"{func}: {name} has sparse initializers "
            f"({shown(proto.graph.sparse_initializer[0].values.name)!r}); expected dense ones "
            "(hint: convert them with onnx.numpy_helper)"
        )
    proto = _load_external(proto, directory, name, func, onnx)
    graph = proto.graph
    initializers = {t.name: t for t in graph.initializer}
    nodes = list(graph.node)
    names = _node_names(nodes)
    known = set(initializers) | {i.name for i in graph.input}
    order = _sorted_nodes(nodes, names, known, name, func)
    produced = known | {o for node in nodes for o in node.output}
    for output in graph.output:
        if output.name not in produced:
            raise ReparamError(
                f"{func}: {name}: graph output {shown(output.name)!r} is produced by no node, "
                "graph input or initializer"
            )
    try:
        inferred = onnx.shape_inference.infer_shapes(_inference_model(proto, onnx), data_prop=True)
    except Exception as exc:  # onnx raises its own InferenceError, or a RuntimeError
        raise ReparamError(
            f"{func}: {name}: ONNX shape inference fails ({type(exc).__name__}: "
            f"{shown(exc, 100)}); expected a valid model"
        ) from None
    types, shapes = _elem_types(proto, inferred)

    constants: dict[str, npt.NDArray[Any]] = {
        key: _to_array(tensor, name, func, onnx) for key, tensor in initializers.items()
    }
    constant_nodes: dict[str, Any] = {}
    evaluated = _evaluate_parameters(proto, nodes, order, shapes, onnx)
    ops: list[Op] = []
    sources: dict[str, tuple[Op, Any]] = {}
    used = {t for node in nodes for t in _reads(node)} | {o.name for o in graph.output}
    translator = _Translator(constants, shapes, types, used, onnx)
    for index in order:
        node = nodes[index]
        default = node.domain in _DEFAULT_DOMAINS
        if default and node.op_type == "Constant" and len(node.output) == 1:
            value = _constant_value(node, name, func, onnx)
            if value is not None:
                constants[node.output[0]] = value
                constant_nodes[node.output[0]] = node
                continue
        if (
            default
            and node.op_type == "Identity"
            and len(node.input) == 1
            and len(node.output) == 1
            and node.input[0] in constants
        ):
            constants[node.output[0]] = constants[node.input[0]]
            constant_nodes[node.output[0]] = node
            continue
        if index in evaluated:
            for tensor, value in evaluated[index].items():
                constants[tensor] = value
                constant_nodes[tensor] = node
            continue
        op = translator.op(node, names[index])
        ops.append(op)
        sources[op.name] = (op, node)
    inputs = tuple(i.name for i in graph.input if i.name not in initializers)
    computed_shapes = {t: s for t, s in shapes.items() if t not in constants}
    result = Graph(
        tuple(ops), inputs, tuple(o.name for o in graph.output), constants, computed_shapes
    )
    source = OnnxSource(
        proto, name, sources, constant_nodes, constants, types, frozenset(constants)
    )
    if owned:
        source = _without_weights(source, nodes, onnx)
    return result, source


def _without_weights(source: OnnxSource, nodes: list[Any], onnx: Any) -> OnnxSource:
    """Return ``source`` on a copy of its model whose large initializers hold no data.

    Those initializers are in ``source.constants`` as arrays; :func:`_write` writes back the
    ones the folded model still reads (``cleared``). Nodes are re-pointed to the copy's.
    """
    model = source.model
    copy = onnx.ModelProto()
    for field, value in model.ListFields():
        if field.name != "graph":
            _set_field(copy, field, value)
    for field, value in model.graph.ListFields():
        if field.name != "initializer":
            _set_field(copy.graph, field, value)
    cleared = set()
    for tensor in model.graph.initializer:
        if (
            _stored_bytes(tensor) >= _INFERENCE_THRESHOLD
            and tensor.data_type != onnx.TensorProto.BFLOAT16  # its bits are not in the array
            and tensor.name in source.constants
        ):
            bare = copy.graph.initializer.add()
            bare.name = tensor.name
            bare.data_type = tensor.data_type
            bare.dims.extend(tensor.dims)
            cleared.add(tensor.name)
        else:
            copy.graph.initializer.append(tensor)
    where = {id(node): index for index, node in enumerate(nodes)}
    moved = list(copy.graph.node)
    ops = {name: (op, moved[where[id(node)]]) for name, (op, node) in source.ops.items()}
    constant_nodes = {t: moved[where[id(node)]] for t, node in source.constant_nodes.items()}
    return OnnxSource(
        copy,
        source.name,
        ops,
        constant_nodes,
        source.constants,
        source.elem_types,
        source.names,
        cleared,
    )


# --------------------------------------------------------------------------- write


def _bfloat16_bits(array: npt.NDArray[Any]) -> npt.NDArray[np.uint16]:
    """Round values to bfloat16 once (to nearest, ties to even), from float64 if given so.

    bfloat16 keeps 8 significant bits and float32's exponent range: each value is
    rounded at its own 8th bit (at 2**-133, the smallest subnormal, below 2**-126),
    which is then exact in float32, whose upper 16 bits are the result. NaN stays a
    quiet NaN; beyond bfloat16's largest value, infinity.
    """
    wide = np.asarray(array, dtype=np.float64)
    mantissa, exponent = np.frexp(wide)
    with np.errstate(over="ignore", invalid="ignore"):
        rounded = np.ldexp(np.rint(np.ldexp(mantissa, 8)), exponent - 8)
        tiny = np.abs(wide) < 2.0**-126
        rounded[tiny] = np.rint(wide[tiny] * 2.0**133) * 2.0**-133
        single = rounded.astype(np.float32)
    bits: npt.NDArray[np.uint16] = (single.view(np.uint32) >> 16).astype(np.uint16)
    nan = np.isnan(wide)
    bits[nan] = ((np.float32(np.nan).view(np.uint32) >> 16) | 0x40).astype(np.uint16)
    return bits


def _fill(tensor: Any, array: npt.NDArray[Any], elem_type: int | None, onnx: Any) -> None:
    """Write ``array`` into ``tensor`` (its dims, type and raw data), as :func:`_initializer`."""
    made = _initializer(tensor.name, array, elem_type, onnx)
    del tensor.dims[:]
    tensor.dims.extend(made.dims)
    tensor.data_type = made.data_type
    tensor.raw_data = made.raw_data


def _initializer(name: str, array: npt.NDArray[Any], elem_type: int | None, onnx: Any) -> Any:
    """Return a new initializer of ``array`` in ``elem_type`` (rounded once), else its dtype."""
    tensor_type = onnx.TensorProto
    if elem_type == tensor_type.BFLOAT16:
        tensor = onnx.TensorProto()
        tensor.name = name
        tensor.data_type = tensor_type.BFLOAT16
        tensor.dims.extend(array.shape)
        tensor.raw_data = _bfloat16_bits(array).astype("<u2").tobytes()
        return tensor
    if elem_type is not None and elem_type in _FLOATS:
        array = array.astype(onnx.helper.tensor_dtype_to_np_dtype(elem_type))
    return onnx.numpy_helper.from_array(np.ascontiguousarray(array), name)


def write_graph(graph: Graph, report: FoldReport, source: OnnxSource) -> Any:
    """Write a folded graph back as an ONNX model.

    Parameters
    ----------
    graph : Graph
        What :func:`~reparam.graph.fold.fold_graph` returned for the graph
        :func:`read_graph` read.
    report : FoldReport
        Its report: its ``conv`` ops are the only new ops allowed.
    source : OnnxSource
        What :func:`read_graph` returned with the graph.

    Returns
    -------
    onnx.ModelProto
        Every op of the source is its original node, unchanged; each new conv a
        ``Conv`` node named after its op, its weight and bias new initializers in
        the element type of the tensor it reads (bfloat16 and float16 stay so).
        Initializers, ``Constant`` nodes and value infos nothing uses any more
        are dropped. Graph inputs and outputs, opset imports, metadata, producer
        and doc strings are the source's. External data is held in memory; see
        :func:`save_onnx`.

    Raises
    ------
    ReparamError
        If ``graph`` holds an op that neither comes from ``source`` nor is a
        conv of ``report``, or if the result fails ``onnx.checker`` where the
        source passes it.
    """
    func = "write_graph"
    onnx = _import_onnx(func)
    if not isinstance(source, OnnxSource):
        raise ReparamError(
            f"{func}: source must be what read_graph returned; got {type(source).__name__}"
        )
    return _write(graph, report, source, func=func, onnx=onnx, in_place=False)


def _write(
    graph: Graph, report: FoldReport, source: OnnxSource, *, func: str, onnx: Any, in_place: bool
) -> Any:
    """Build the folded model; ``in_place`` edits ``source.model`` itself (no weight copied).

    Only :func:`fold_onnx` writes in place, on a model it read from a file and owns.
    """
    new_convs = {region.conv.name: region.conv for region in report.folded}
    model = source.model
    nodes = []
    for op in graph.ops:
        original = source.ops.get(op.name)
        if original is not None and original[0] is op:
            nodes.append(original[1])
        elif new_convs.get(op.name) is op:
            nodes.append(_conv_node(op, onnx) if op.kind == "conv" else _gemm_node(op, onnx))
        else:
            raise ReparamError(
                f"{func}: {op.shown} is neither a node of {source.name} nor a conv of the report; "
                "expected the graph fold_graph returned for it"
            )
    # what the kept nodes read, and the constants (initializers, Constant nodes) behind it
    needed = {t for node in nodes for t in _reads(node)} | set(graph.outputs)
    pending = [t for t in needed if t in source.constant_nodes]
    while pending:  # an alias reads another constant
        for tensor in source.constant_nodes[pending.pop()].input:
            if tensor not in needed:
                needed.add(tensor)
                if tensor in source.constant_nodes:
                    pending.append(tensor)
    # in the order read_graph met them (an alias after what it reads), each node once
    constant_nodes = list(
        {id(n): n for t, n in source.constant_nodes.items() if t in needed}.values()
    )
    initializers = []
    kept = set()
    for tensor in model.graph.initializer:
        if tensor.name in needed:
            initializers.append(tensor)
            kept.add(tensor.name)
    parameter_of = {t: op for op in new_convs.values() for t in op.inputs[1:]}
    created = [name for name in graph.constants if name in needed and name not in source.names]
    kept.update(created)

    def elem_type(name: str) -> int | None:  # a Conv's weight and bias: the type of its input
        conv = parameter_of.get(name)
        return source.elem_types.get(conv.inputs[0]) if conv is not None else None

    if not in_place:
        initializers += [
            _initializer(name, np.asarray(graph.constants[name]), elem_type(name), onnx)
            for name in created
        ]

    initializer_names = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initializer_names or i.name in kept]
    produced = {o for node in [*constant_nodes, *nodes] for o in node.output}
    existing = kept | produced | {i.name for i in inputs}
    if in_place:
        source_passes = _passes(model, onnx)  # checked before it is edited
        result = model
        out = result.graph
        kept_nodes = [_copied(node, onnx) for node in [*constant_nodes, *nodes]]
        for index in reversed(range(len(out.initializer))):  # drop in place: nothing copied
            tensor = out.initializer[index]
            if tensor.name not in kept:
                del out.initializer[index]
            elif not tensor.HasField("raw_data") and tensor.name in source.cleared:
                _fill(tensor, source.constants[tensor.name], tensor.data_type, onnx)
        _keep(out.input, lambda i: i.name not in initializer_names or i.name in kept)
        _keep(out.value_info, lambda v: v.name in existing)
        _keep(out.quantization_annotation, lambda q: q.tensor_name in existing)
        del out.node[:]
        out.node.extend(kept_nodes)
        for name in created:  # each written into the model directly, not copied into it
            tensor = out.initializer.add()
            tensor.name = name
            _fill(tensor, np.asarray(graph.constants[name]), elem_type(name), onnx)
        _check(result, None if source_passes else model, source.name, func, onnx)
        return result
    result = onnx.ModelProto()
    for field, value in model.ListFields():
        if field.name != "graph":
            _set_field(result, field, value)
    out = result.graph
    skip = ("node", "initializer", "input", "value_info", "quantization_annotation")
    for field, value in model.graph.ListFields():
        if field.name not in skip:
            _set_field(out, field, value)
    out.input.extend(inputs)
    out.node.extend(constant_nodes)
    out.node.extend(nodes)
    out.initializer.extend(initializers)
    out.value_info.extend(v for v in model.graph.value_info if v.name in existing)
    out.quantization_annotation.extend(
        q for q in model.graph.quantization_annotation if q.tensor_name in existing
    )
    _check(result, model, source.name, func, onnx)
    return result


def _copied(message: Any, onnx: Any) -> Any:
    """Return a detached copy of a NodeProto (its container is about to be rewritten)."""
    copy = onnx.NodeProto()
    copy.CopyFrom(message)
    return copy


def _keep(container: Any, wanted: Any) -> None:
    """Delete, in place, the items of a repeated protobuf field that ``wanted`` rejects."""
    for index in reversed(range(len(container))):
        if not wanted(container[index]):
            del container[index]


def _conv_node(op: Op, onnx: Any) -> Any:
    attrs = op.attrs
    (top, bottom), (left, right) = attrs["pads"]
    kernel = attrs.get("kernel_shape")
    node_attrs: dict[str, Any] = {}
    if kernel is not None:
        node_attrs["kernel_shape"] = [int(k) for k in kernel[2:]]
    return onnx.helper.make_node(
        "Conv",
        list(op.inputs),
        list(op.outputs),
        name=op.name,
        strides=[int(s) for s in attrs["stride"]],
        pads=[int(top), int(left), int(bottom), int(right)],
        group=int(attrs["groups"]),
        dilations=[int(d) for d in attrs["dilation"]],
        **node_attrs,
    )


def _gemm_node(op: Op, onnx: Any) -> Any:
    """Write a folded linear layer: ``Gemm(x, W, b, transB=1)``, ``W`` of shape (C_out, C_in)."""
    return onnx.helper.make_node("Gemm", list(op.inputs), list(op.outputs), name=op.name, transB=1)


def _passes(model: Any, onnx: Any) -> bool:
    """Whether ``model`` passes the full checker (on its structure: see :func:`_check`)."""
    try:
        onnx.checker.check_model(_inference_model(model, onnx), full_check=True)
    except Exception:  # onnx.checker.ValidationError, or shape inference's errors
        return False
    return True


def _check(result: Any, model: Any | None, name: str, func: str, onnx: Any) -> None:
    """Run the full checker on the result; a failure is ours only if the source passes it.

    ``model`` is the source, or None when it is known to pass (checked before an edit
    in place).

    The checker serializes the model and infers shapes on it: it runs on a copy whose
    large initializers are typed graph inputs (:func:`_inference_model`), which checks the
    same structure without copying the weights (the new ones are written from arrays of
    the right shape and type).
    """
    try:
        onnx.checker.check_model(_inference_model(result, onnx), full_check=True)
    except Exception as exc:  # onnx.checker.ValidationError, or shape inference's errors
        if model is not None and not _passes(model, onnx):
            return  # the source fails it too: the fold made nothing worse
        raise ReparamError(
            f"{func}: the folded {name} fails onnx.checker ({type(exc).__name__}: "
            f"{shown(exc, 120)}) where the source passes; this is a bug in reparam, please "
            "report it"
        ) from None


# --------------------------------------------------------------------------- fold and save


def fold_onnx(
    model: Any,
    *,
    max_cost_ratio: float = 1.0,
    image_size: tuple[int, int] | None = None,
    func: str = "fold_onnx",
) -> tuple[Any, FoldReport]:
    """Fold every region of an ONNX model that is one convolution into one ``Conv`` node.

    Parameters
    ----------
    model : onnx.ModelProto or str or path-like
        The train-form model, or its ``.onnx`` file.
    max_cost_ratio : float, default 1.0
        As :func:`~reparam.graph.fold.fold_graph`: 1.0 never makes the model
        slower.
    image_size : (int, int), optional
        As :func:`~reparam.graph.fold.fold_graph`.
    func : str, default "fold_onnx"
        The name errors start with (as for :func:`read_graph`).

    Returns
    -------
    model : onnx.ModelProto
        The folded model (:func:`write_graph`); :func:`save_onnx` writes it. A model
        read from a file is folded in place of its own weights: the weights are held
        once, as arrays, and each region's go once it is folded.
    report : FoldReport
        What was folded, and what was not and why.

    Raises
    ------
    ReparamError
        As :func:`read_graph` and :func:`~reparam.graph.fold.fold_graph`.
    OSError
        If the file cannot be read.

    Examples
    --------
    >>> import numpy as np, onnx
    >>> from onnx import helper, numpy_helper, TensorProto
    >>> from reparam.graph import fold_onnx
    >>> rng = np.random.default_rng(0)
    >>> weights = [
    ...     numpy_helper.from_array(rng.standard_normal((4, 4, 3, 3)).astype(np.float32), "w3"),
    ...     numpy_helper.from_array(rng.standard_normal((4, 4, 1, 1)).astype(np.float32), "w1"),
    ... ]
    >>> nodes = [
    ...     helper.make_node("Conv", ["x", "w3"], ["a"], name="conv3", pads=[1, 1, 1, 1]),
    ...     helper.make_node("Conv", ["x", "w1"], ["b"], name="conv1"),
    ...     helper.make_node("Add", ["a", "b"], ["y"], name="sum"),
    ... ]
    >>> io = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 4, 8, 8]) for n in "xy"]
    >>> graph = helper.make_graph(nodes, "block", io[:1], io[1:], initializer=weights)
    >>> model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    >>> folded, report = fold_onnx(model)
    >>> [node.op_type for node in folded.graph.node]
    ['Conv']
    >>> print(report.lines()[0])
    1 regions folded; ops 3 -> 1; parameters 160 -> 148; multiply-adds 10,240 -> 9,216
    """
    onnx = _import_onnx(func)
    # A model read from a file is ours: its weights, once arrays, need not stay in it too (the
    # ones the folded model still reads are written back), and the result is built in it.
    in_place = not isinstance(model, onnx.ModelProto)
    graph, source = _read_graph(model, func=func, owned=in_place)
    # the graph is ours too when the model is: each region's weights go once it is folded
    folded, report = _fold_graph(graph, max_cost_ratio, image_size, release=in_place, func=func)
    del graph
    return _write(folded, report, source, func=func, onnx=onnx, in_place=in_place), report


def _raw_bytes(tensor: Any, onnx: Any) -> bytes:
    if tensor.HasField("raw_data"):
        return bytes(tensor.raw_data)
    array = onnx.numpy_helper.to_array(tensor)
    return bytes(np.ascontiguousarray(array).astype(array.dtype.newbyteorder("<")).tobytes())


def _varint(value: int) -> bytes:
    """Return ``value`` as a protobuf varint (7 bits a byte, low first)."""
    out = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        out.append(low | (0x80 if value else 0))
        if not value:
            return bytes(out)


_GRAPH_FIELD = 7  # ModelProto.graph
_INITIALIZER_FIELD = 5  # GraphProto.initializer


def _write_streamed(path: Path, model: Any, onnx: Any) -> None:
    """Write ``model`` as protobuf, one initializer at a time (never the whole file in memory).

    A message's fields may come in any order and a length-delimited field is its tag, its
    length and its bytes: the model without its graph, then the graph's tag and length, the
    graph without its initializers, and each initializer as one more ``initializer`` field.
    """
    shell = onnx.ModelProto()
    for field, value in model.ListFields():
        if field.name != "graph":
            _set_field(shell, field, value)
    graph = onnx.GraphProto()
    for field, value in model.graph.ListFields():
        if field.name != "initializer":
            _set_field(graph, field, value)
    head = graph.SerializeToString()
    tag = _varint(_INITIALIZER_FIELD << 3 | 2)
    sizes = [tensor.ByteSize() for tensor in model.graph.initializer]
    length = len(head) + sum(len(tag) + len(_varint(n)) + n for n in sizes)

    def write(stream: IO[bytes]) -> None:
        stream.write(shell.SerializeToString())
        if model.HasField("graph"):
            stream.write(_varint(_GRAPH_FIELD << 3 | 2) + _varint(length) + head)
            for tensor, size in zip(model.graph.initializer, sizes, strict=True):
                stream.write(tag + _varint(size))
                stream.write(tensor.SerializeToString())

    write_atomic(path, write)


def _write_bytes(path: Path, data: bytes) -> None:
    def write(stream: IO[bytes]) -> None:
        stream.write(data)

    write_atomic(path, write)


def save_onnx(model: Any, path: str | os.PathLike[str]) -> None:
    """Write an ONNX model atomically; one near 2 GiB with its weights in ``PATH.data``.

    Parameters
    ----------
    model : onnx.ModelProto
    path : str or path-like
        The file to write: a temporary file in its directory, then renamed
        over it, so a failure leaves no partial file (and an old file
        untouched). A model too large for one protobuf message (2 GiB) keeps
        every initializer of at least 1 KiB in ``PATH.data`` next to it
        (written the same way, first), as ``onnx.save`` with
        ``save_as_external_data`` would.

    Raises
    ------
    ReparamError
        If ``model`` is not an ``onnx.ModelProto``.
    OSError
        If writing fails, naming ``path``.
    """
    func = "save_onnx"
    onnx = _import_onnx(func)
    if not isinstance(model, onnx.ModelProto):
        raise ReparamError(f"{func}: model must be an onnx.ModelProto; got {type(model).__name__}")
    target = Path(path)
    # (about the model's size without serializing it: ByteSize() would, all at once)
    weights = sum(_stored_bytes(tensor) for tensor in model.graph.initializer)
    if weights < PROTOBUF_LIMIT - 2 * _HEADROOM:
        _write_streamed(target, model, onnx)
        return
    location = target.name + ".data"
    shell = onnx.ModelProto()
    for field, value in model.ListFields():
        if field.name != "graph":
            _set_field(shell, field, value)
    for field, value in model.graph.ListFields():
        if field.name != "initializer":
            _set_field(shell.graph, field, value)
    large: list[Any] = []
    offset = 0
    for tensor in model.graph.initializer:
        size = _tensor_bytes(tensor, onnx)
        if (
            tensor.data_location == onnx.TensorProto.EXTERNAL
            or tensor.data_type == onnx.TensorProto.STRING
            or size is None
            or size < EXTERNAL_THRESHOLD
        ):
            shell.graph.initializer.append(tensor)
            continue
        offset = -(-offset // 4096) * 4096  # aligned, as onnx writes it
        moved = shell.graph.initializer.add()
        moved.name = tensor.name
        moved.data_type = tensor.data_type
        moved.dims.extend(tensor.dims)
        moved.doc_string = tensor.doc_string
        moved.data_location = onnx.TensorProto.EXTERNAL
        for key, value in (("location", location), ("offset", offset), ("length", size)):
            entry = moved.external_data.add()
            entry.key, entry.value = key, str(value)
        large.append((offset, tensor))
        offset += size

    def write_data(stream: IO[bytes]) -> None:
        position = 0
        for start, tensor in large:
            stream.write(b"\0" * (start - position))
            data = _raw_bytes(tensor, onnx)
            stream.write(data)
            position = start + len(data)

    write_atomic(target.with_name(location), write_data)
    _write_bytes(target, shell.SerializeToString())
