"""Checkpoint files: read and write flat state dicts of arrays, safely and atomically.

Formats, chosen by the file suffix: ``.npz`` (NumPy, no pickle),
``.safetensors`` (read here with NumPy alone, bfloat16 included; writing
needs the ``safetensors`` package) and ``.pth`` / ``.pt`` (needs PyTorch;
read with ``weights_only=True``, so pickled code never runs).

Reading checks what a file declares before it reads any array: the names of
the members of an ``.npz`` and of the tensors of a ``.safetensors`` file go
to a caller's key check first, and every declared size must agree with the
array's header and with the file (an ``.npz`` member may not inflate to more
than :data:`MAX_INFLATION` times its compressed size beyond
:data:`INFLATION_FLOOR` bytes), so a zip bomb or a lying header is refused
before it costs memory.

Writing is atomic: a temporary file in the destination's directory,
``fsync``, then :func:`os.replace`. A new file gets the permissions the
umask allows (as ``open`` would give it); a replaced file keeps its mode.
Nothing here knows what the tensors mean.
"""

from __future__ import annotations

import contextlib
import errno
import io as _io
import json
import math
import os
import pickle
import re
import secrets
import stat
import warnings
import zipfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any, NamedTuple

import numpy as np
import numpy.typing as npt

from ..core.errors import ReparamError

__all__ = [
    "CHECKPOINT_SUFFIXES",
    "INFLATION_FLOOR",
    "MAX_INFLATION",
    "TensorFile",
    "Tensors",
    "check_destination",
    "check_suffix",
    "listing",
    "read_array",
    "read_checkpoint",
    "read_tensors",
    "save_array",
    "shown",
    "shown_path",
    "write_atomic",
    "write_tensors",
]

Tensors = dict[str, npt.NDArray[Any]]
KeyCheck = Callable[[list[str]], None]

CHECKPOINT_SUFFIXES = (".npz", ".safetensors", ".pth", ".pt")

#: Containers that hold the state dict, unwrapped in this order of preference.
WRAPPERS = ("state_dict", "model_state_dict", "model")
#: Key prefixes added by wrappers: DDP's ``module.`` and torch.compile's ``_orig_mod.``.
PREFIXES = ("module.", "_orig_mod.")

#: An ``.npz`` whose members declare more than this many times their compressed size...
MAX_INFLATION = 100
#: ... and more than this many bytes in all is refused as a zip bomb.
INFLATION_FLOOR = 64 * 2**20

_KIND = {
    ".npz": "a NumPy .npz archive",
    ".safetensors": "a safetensors file",
    ".pth": "a PyTorch checkpoint",
    ".pt": "a PyTorch checkpoint",
    ".npy": "a NumPy .npy array",
}


class TensorFile(NamedTuple):
    """What a checkpoint file held.

    Attributes
    ----------
    tensors : dict of str to ndarray
        The arrays, containers and key prefixes removed; bfloat16 widened
        (exactly) to float32.
    stored : dict of str to str
        The dtype of each tensor as the file stores it (``"bfloat16"``,
        ``"float16"``, ``"float32"``, ...).
    """

    tensors: Tensors
    stored: dict[str, str]


# --------------------------------------------------------------------------- messages


def shown(text: object, limit: int = 80) -> str:
    r"""Return ``text`` fit for a one-line message: control characters escaped, shortened.

    Examples
    --------
    >>> shown("a\nb")
    'a\\nb'
    >>> shown("x" * 100, limit=11)
    'xxxx...xxxx'
    """
    text = str(text)
    if not text.isprintable():
        text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
    if len(text) > limit:
        keep = limit - 3
        text = text[: keep // 2] + "..." + text[len(text) - (keep - keep // 2) :]
    return text


def shown_path(path: str | os.PathLike[str]) -> str:
    """Return a path as messages name it: as the user gave it (only absurd lengths shortened)."""
    return shown(os.fspath(path), 120)


def listing(items: Sequence[str], *, budget: int = 150) -> str:
    """Join the first items that fit in ``budget`` characters (at least one), then "and N more".

    Examples
    --------
    >>> listing(["missing key a", "missing key b", "missing key c"], budget=30)
    'missing key a; missing key b; and 1 more'
    """
    kept: list[str] = []
    used = 0
    for item in items:
        if kept and used + len(item) + 2 > budget:
            break
        kept.append(item)
        used += len(item) + 2
    rest = len(items) - len(kept)
    return "; ".join(kept) + (f"; and {rest} more" if rest else "")


def _reason(exc: BaseException) -> str:
    """Say a parser's exception in a few words, never passing on its advice to load unsafely."""
    text = str(exc).strip().split("\n")[0]
    text = re.split(r"\.\s", text)[0].rstrip(".")
    if "weights_only" in text or not text:
        return type(exc).__name__
    return f"{type(exc).__name__}: {shown(text, 80)}"


def check_suffix(path: Path, *, func: str, allowed: tuple[str, ...]) -> str:
    """Return the lower-case suffix of ``path``, which must be one of ``allowed``."""
    suffix = path.suffix.lower()
    if suffix not in allowed:
        raise ReparamError(
            f"{func}: unknown file format {shown(path.name)!r}; got suffix "
            f"{shown(suffix, 20) or '(none)'!r}, expected one of {', '.join(allowed)}"
        )
    return suffix


def _import_safetensors(func: str) -> Any:
    try:
        import safetensors.numpy
    except ImportError:
        raise ReparamError(
            f"{func}: writing .safetensors needs the safetensors package; "
            "hint: pip install safetensors (or use .npz)"
        ) from None
    return safetensors.numpy


def _import_torch(func: str) -> Any:
    try:
        import torch
    except ImportError:
        raise ReparamError(
            f"{func}: .pth/.pt checkpoints are PyTorch pickles and need PyTorch to read and "
            "write; hint: pip install torch, or convert the checkpoint to .safetensors or .npz"
        ) from None
    return torch


# --------------------------------------------------------------------------- containers


def _strip_prefixes(keys: Iterable[str]) -> tuple[list[str], str]:
    """Remove ``module.`` / ``_orig_mod.`` shared by every key; return the keys and what went."""
    current = [str(key) for key in keys]
    removed = ""
    while current:
        for prefix in PREFIXES:
            if all(key.startswith(prefix) for key in current):
                current = [key.removeprefix(prefix) for key in current]
                removed += prefix
                break
        else:
            break
    return current, removed


def _unwrap(tensors: Mapping[Any, Any]) -> dict[str, Any]:
    """Unwrap ``state_dict`` / ``model_state_dict`` / ``model`` containers and key prefixes."""
    current: Mapping[Any, Any] = tensors
    while True:
        for wrapper in WRAPPERS:
            inner = current.get(wrapper)
            if isinstance(inner, Mapping):
                current = inner
                break
        else:
            break
    keys, _ = _strip_prefixes(current)
    return dict(zip(keys, current.values(), strict=True))


# --------------------------------------------------------------------------- .npy headers


class _NpyHeader(NamedTuple):
    shape: tuple[int, ...]
    dtype: np.dtype[Any]
    offset: int  # bytes before the data
    nbytes: int  # bytes of data the header declares


def _npy_header(stream: IO[bytes], what: str, *, func: str = "load") -> _NpyHeader:
    """Read and check a .npy header (refusing pickled object arrays); leave the stream after it."""
    version = np.lib.format.read_magic(stream)
    if version == (1, 0):
        shape, _, dtype = np.lib.format.read_array_header_1_0(stream)
    elif version == (2, 0):
        shape, _, dtype = np.lib.format.read_array_header_2_0(stream)
    else:
        raise ValueError(f"unsupported .npy format version {version}")
    if dtype.hasobject:
        raise ReparamError(
            f"{func}: {what} holds pickled Python objects, which reparam does not load; "
            "expected a numeric array"
        )
    return _NpyHeader(tuple(shape), dtype, stream.tell(), math.prod(shape) * dtype.itemsize)


# --------------------------------------------------------------------------- readers


def _read_npz(
    stream: IO[bytes], size: int, name: str, check_keys: KeyCheck | None
) -> dict[str, npt.NDArray[Any]]:
    with zipfile.ZipFile(stream) as archive:
        infos = archive.infolist()
        members = [info.filename for info in infos]
        odd = [shown(member, 40) for member in members if not member.endswith(".npy")]
        if odd:
            raise ReparamError(
                f"load: {name} has members that are not .npy arrays: {listing(odd, budget=80)}; "
                "expected an archive written by numpy.savez"
            )
        if len(set(members)) != len(members):
            repeated = sorted({shown(m, 40) for m in members if members.count(m) > 1})
            raise ReparamError(
                f"load: {name} holds the same member twice: {listing(repeated, budget=80)}; "
                "expected each array once"
            )
        keys, _ = _strip_prefixes(member.removesuffix(".npy") for member in members)
        if check_keys is not None:
            check_keys(keys)
        declared = sum(info.file_size for info in infos)
        compressed = sum(info.compress_size for info in infos)
        if declared > INFLATION_FLOOR and declared > MAX_INFLATION * max(compressed, 1):
            raise ReparamError(
                f"load: {name} declares {declared:,} bytes of arrays in {size:,} bytes of file "
                f"(more than {MAX_INFLATION}x compression); refusing to inflate a likely zip bomb"
            )
        headers = []
        for info, key in zip(infos, keys, strict=True):
            with archive.open(info) as member:
                header = _npy_header(member, f"{name} ({shown(key, 60)})")
            if header.offset + header.nbytes != info.file_size:
                raise ReparamError(
                    f"load: {name}: {shown(key, 60)} declares shape {header.shape} "
                    f"({header.nbytes:,} bytes) but its member holds "
                    f"{info.file_size - header.offset:,}; the archive is damaged"
                )
            headers.append(header)
        arrays = {}
        for info, key in zip(infos, keys, strict=True):
            with archive.open(info) as member:
                arrays[key] = np.lib.format.read_array(member, allow_pickle=False)
    return arrays


# safetensors dtype codes NumPy reads directly (little-endian); BF16 is widened by hand.
_SAFETENSORS_DTYPES = {
    "F64": "<f8",
    "F32": "<f4",
    "F16": "<f2",
    "I64": "<i8",
    "I32": "<i4",
    "I16": "<i2",
    "I8": "i1",
    "U64": "<u8",
    "U32": "<u4",
    "U16": "<u2",
    "U8": "u1",
    "BOOL": "?",
}
_MAX_SAFETENSORS_HEADER = 100_000_000  # the format's own limit


def _bfloat16_to_float32(bits: npt.NDArray[Any]) -> npt.NDArray[np.float32]:
    """Widen bfloat16 bit patterns (uint16) to float32: the same sign, exponent and top mantissa."""
    widened = (bits.astype("<u4") << 16).view("<f4")
    return widened.astype(np.float32)


def _read_safetensors(
    stream: _io.BufferedReader, size: int, name: str, check_keys: KeyCheck | None
) -> tuple[dict[str, npt.NDArray[Any]], dict[str, str]]:
    prefix = stream.read(8)
    if len(prefix) < 8:
        raise ValueError(f"the file has {size} bytes, less than the 8-byte header length")
    length = int.from_bytes(prefix, "little")
    if length > min(size - 8, _MAX_SAFETENSORS_HEADER):
        raise ValueError(f"the header declares {length:,} bytes but the file has {size:,}")
    header = json.loads(stream.read(length))
    if not isinstance(header, dict):
        raise ValueError("the header is not a JSON object")
    header.pop("__metadata__", None)
    data_size = size - 8 - length
    entries: dict[str, tuple[str, tuple[int, ...], int, int]] = {}
    for key, entry in header.items():
        what = f"{name}: tensor {shown(key, 40)}"
        try:
            code, shape, (begin, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
        except (TypeError, KeyError, ValueError):
            raise ValueError(
                f"tensor {shown(key, 60)} has no dtype, shape and data_offsets"
            ) from None
        if code != "BF16" and code not in _SAFETENSORS_DTYPES:
            raise ReparamError(
                f"load: {what} has dtype {shown(code, 20)}, which reparam does not read; "
                "expected F64, F32, F16 or BF16"
            )
        numbers = (*shape, begin, end)
        if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in numbers):
            raise ValueError(f"tensor {shown(key, 60)} has a bad shape or data_offsets")
        itemsize = 2 if code == "BF16" else np.dtype(_SAFETENSORS_DTYPES[code]).itemsize
        nbytes = math.prod(shape) * itemsize
        if end - begin != nbytes:
            raise ReparamError(
                f"load: {what} of shape {shown(shape, 30)} needs {nbytes:,} bytes but declares "
                f"{end - begin:,}; the file is damaged"
            )
        if end > data_size:
            raise ReparamError(
                f"load: {what} ends at byte {end:,} of a {data_size:,}-byte buffer; the file is "
                "truncated"
            )
        entries[str(key)] = (code, shape, begin, end)
    keys, _ = _strip_prefixes(entries)
    if check_keys is not None:
        check_keys(keys)
    arrays: dict[str, npt.NDArray[Any]] = {}
    stored: dict[str, str] = {}
    for key, (code, shape, begin, end) in zip(keys, entries.values(), strict=True):
        stream.seek(8 + length + begin)
        buffer = bytearray(end - begin)
        if stream.readinto(buffer) != len(buffer):
            raise ValueError(f"tensor {shown(key, 60)} is cut short")
        if code == "BF16":
            array = _bfloat16_to_float32(np.frombuffer(buffer, "<u2"))
            stored[key] = "bfloat16"
        else:
            array = np.frombuffer(buffer, _SAFETENSORS_DTYPES[code])
            array = array.astype(array.dtype.newbyteorder("="), copy=False)
            stored[key] = array.dtype.name
        arrays[key] = array.reshape(shape)
    return arrays, stored


def _unpickling_message(exc: pickle.UnpicklingError, name: str) -> str | None:
    """Say what PyTorch's safe loader refused, in reparam's words (None if it says nothing)."""
    text = str(exc)
    found = re.search(r"GLOBAL ([\w.]+)", text)
    if found:
        return (
            f"load: {name} holds pickled Python objects ({shown(found.group(1), 60)}) that "
            "reparam will not execute; expected a state dict of tensors only; hint: save "
            "model.state_dict() with torch.save, or convert to .safetensors"
        )
    found = re.search(r"Unsupported operand (\d+)", text)
    if found:
        return (
            f"load: {name}: PyTorch's safe loader stops at pickle opcode {found.group(1)} (the "
            "file is damaged, or uses a pickle protocol it does not run) and reparam will not "
            "unpickle unsafely; hint: save it again with torch.save's defaults, or as .safetensors"
        )
    return None


def _read_pytorch(
    stream: IO[bytes], name: str, check_keys: KeyCheck | None
) -> tuple[dict[str, Any], dict[str, str]]:
    torch = _import_torch("load")
    with warnings.catch_warnings():
        # torch warns about pickle protocols it reads anyway: the tool's output is its own.
        warnings.filterwarnings("ignore", category=UserWarning, module=r"torch(\.|$)")
        warnings.filterwarnings("ignore", message=r".*pickle protocol")
        try:
            raw = torch.load(stream, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            message = _unpickling_message(exc, name)
            if message is None:
                raise
            raise ReparamError(message) from None
    if not isinstance(raw, Mapping):
        raise ReparamError(
            f"load: {name} holds a {type(raw).__name__}; expected a state dict (a mapping "
            "of names to tensors)"
        )
    tensors = _unwrap(raw)
    if check_keys is not None:
        check_keys(list(tensors))
    arrays: dict[str, Any] = {}
    stored: dict[str, str] = {}
    for key, value in tensors.items():
        if not isinstance(value, torch.Tensor):
            arrays[key] = value
            continue
        tensor = value.detach().cpu()
        stored[key] = str(tensor.dtype).removeprefix("torch.")
        if tensor.dtype == torch.bfloat16:
            tensor = tensor.float()  # exact: bfloat16 is float32 with a shorter mantissa
        try:
            arrays[key] = tensor.numpy()
        except (TypeError, RuntimeError):
            raise ReparamError(
                f"load: {name}: tensor {shown(key, 60)} has dtype {stored[key]}, which NumPy "
                "cannot hold; expected a floating dtype"
            ) from None
    return arrays, stored


def read_checkpoint(
    path: str | os.PathLike[str], *, check_keys: KeyCheck | None = None
) -> TensorFile:
    """Read a flat state dict from ``.npz``, ``.safetensors``, ``.pth`` or ``.pt``.

    Parameters
    ----------
    path : str or path-like
        The checkpoint; the suffix decides the format.
    check_keys : callable, optional
        Called with the keys (containers and prefixes removed) before any
        array of an ``.npz`` or ``.safetensors`` file is read (after the
        unpickling of a ``.pth``); it raises to refuse the file.

    Returns
    -------
    TensorFile
        The arrays, and the dtype each had in the file.

    Raises
    ------
    ReparamError
        On an unknown suffix, a missing optional package, an entry that is
        not an array, pickled objects, declared sizes that do not add up, or
        a file that cannot be parsed (any error of the parser, including an
        ``OSError`` raised while parsing, names the file).
    OSError
        If the file cannot be opened (it does not exist, is a directory, or
        is not readable); ``filename`` is ``path``.
    """
    func = "load"
    file = Path(path)
    suffix = check_suffix(file, func=func, allowed=CHECKPOINT_SUFFIXES)
    if suffix in (".pth", ".pt"):
        _import_torch(func)
    name = shown_path(path)
    if file.is_dir():
        raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(path))
    stored: dict[str, str] = {}
    with open(file, "rb") as stream:  # an OSError here is about access, not content
        size = os.fstat(stream.fileno()).st_size
        try:
            if suffix == ".npz":
                raw: dict[str, Any] = _read_npz(stream, size, name, check_keys)
            elif suffix == ".safetensors":
                raw, stored = _read_safetensors(stream, size, name, check_keys)
            else:
                raw, stored = _read_pytorch(stream, name, check_keys)
        except ReparamError:
            raise
        except Exception as exc:  # every parser has its own exception types, OSError included
            raise ReparamError(
                f"{func}: cannot parse {name} as {_KIND[suffix]} ({_reason(exc)}); hint: is the "
                "file complete, and is its suffix right?"
            ) from exc
    tensors = _unwrap(raw)
    bad = [shown(key, 40) for key, value in tensors.items() if not isinstance(value, np.ndarray)]
    if bad:
        raise ReparamError(
            f"{func}: {name} has entries that are not tensors: {listing(bad, budget=80)}; "
            "expected a state dict of tensors only"
        )
    arrays = {key: value for key, value in tensors.items() if isinstance(value, np.ndarray)}
    return TensorFile(arrays, {key: stored.get(key, arrays[key].dtype.name) for key in arrays})


def read_tensors(path: str | os.PathLike[str]) -> dict[str, npt.NDArray[Any]]:
    """Read a flat state dict of arrays: ``read_checkpoint(path).tensors``.

    Parameters
    ----------
    path : str or path-like
        ``.npz``, ``.safetensors``, ``.pth`` or ``.pt``; the suffix decides.

    Returns
    -------
    dict of str to ndarray
        Containers (``state_dict``, ``model_state_dict``, ``model``) and the
        ``module.`` / ``_orig_mod.`` prefixes removed.

    Raises
    ------
    ReparamError
        As :func:`read_checkpoint`.
    OSError
        If the file cannot be opened.
    """
    return read_checkpoint(path).tensors


def read_array(path: str | os.PathLike[str], *, func: str = "read_array") -> npt.NDArray[Any]:
    """Read one array from a ``.npy`` file, never unpickling, checking its size first.

    Parameters
    ----------
    path : str or path-like
        A ``.npy`` file.
    func : str, default "read_array"
        The name errors start with.

    Returns
    -------
    ndarray

    Raises
    ------
    ReparamError
        If the suffix is not ``.npy``, the file holds pickled objects, its
        size disagrees with its header (truncated), or it cannot be parsed.
    OSError
        If the file cannot be opened.
    """
    file = Path(path)
    check_suffix(file, func=func, allowed=(".npy",))
    name = shown_path(path)
    if file.is_dir():
        raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(path))
    with open(file, "rb") as stream:
        size = os.fstat(stream.fileno()).st_size
        try:
            header = _npy_header(stream, name, func=func)
            if header.offset + header.nbytes != size:
                raise ReparamError(
                    f"{func}: {name} declares shape {header.shape} ({header.nbytes:,} bytes of "
                    f"{header.dtype}) but holds {size - header.offset:,} bytes; the file is "
                    "truncated or damaged"
                )
            stream.seek(0)
            return np.lib.format.read_array(stream, allow_pickle=False)
        except ReparamError:
            raise
        except Exception as exc:
            raise ReparamError(
                f"{func}: cannot parse {name} as {_KIND['.npy']} ({_reason(exc)}); hint: write "
                "it with numpy.save"
            ) from exc


# --------------------------------------------------------------------------- writers


def check_destination(
    path: str | os.PathLike[str], *, func: str, allowed: tuple[str, ...], what: str = "output"
) -> None:
    """Check, before any work, that ``path`` can be written as one of ``allowed``.

    Parameters
    ----------
    path : str or path-like
        The file to write (a symlink is followed).
    func : str
        The name errors start with.
    allowed : tuple of str
        Allowed suffixes, e.g. ``(".npz", ".safetensors")``.
    what : str, default "output"
        How errors call the file.

    Raises
    ------
    ReparamError
        If ``path`` is a directory, its directory does not exist or is not
        writable, its suffix is not allowed, or the package needed to write
        that format is missing. The message names ``path`` as given.
    """
    name = shown_path(path)
    file = Path(os.path.realpath(path))
    if file.is_dir():
        raise ReparamError(
            f"{func}: the {what} {name} is a directory; expected a file name such as "
            f"{shown(Path(path) / ('model' + allowed[0]))}"
        )
    suffix = Path(path).suffix.lower()
    if suffix not in allowed:
        raise ReparamError(
            f"{func}: unknown file format {shown(Path(path).name)!r} for the {what}; got suffix "
            f"{shown(suffix, 20) or '(none)'!r}, expected one of {', '.join(allowed)}"
        )
    directory = file.parent
    if not directory.is_dir():
        state = "is not a directory" if directory.exists() else "does not exist"
        raise ReparamError(
            f"{func}: cannot write the {what} {name}: its directory {shown(directory)} {state}; "
            "hint: create the directory first"
        )
    if not os.access(directory, os.W_OK | os.X_OK):
        raise ReparamError(
            f"{func}: cannot write the {what} {name}: no permission to create files in "
            f"{shown(directory)}"
        )
    if suffix == ".safetensors":
        _import_safetensors(func)
    elif suffix in (".pth", ".pt"):
        _import_torch(func)


def _temporary(directory: Path, name: str) -> tuple[int, Path]:
    """Create a new file next to the destination, mode 0666 minus the umask (as ``open`` does)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    for _ in range(100):
        candidate = directory / f".{name}.{secrets.token_hex(4)}.tmp"
        try:
            return os.open(candidate, flags, 0o666), candidate
        except FileExistsError:
            continue
    raise FileExistsError(
        errno.EEXIST, "no unused temporary name", str(directory)
    )  # pragma: no cover


def _naming(exc: OSError, path: str | os.PathLike[str]) -> OSError:
    """Return the same error naming the user's ``path`` instead of a temporary file."""
    code = exc.errno if exc.errno is not None else errno.EIO  # callers pass errors with an errno
    return OSError(code, exc.strerror or os.strerror(code), str(path))


def write_atomic(path: str | os.PathLike[str], write: Callable[[IO[bytes]], None]) -> None:
    """Write through ``write`` into a temporary file next to ``path``, then rename it over ``path``.

    A new file gets mode ``0666`` minus the umask; a file that is replaced
    keeps its mode. A symlink is followed (its target is replaced). On any
    failure the temporary file is removed and the old file is untouched.

    Raises
    ------
    OSError
        If writing fails; ``filename`` is ``path`` (never the temporary file).
    """
    target = Path(os.path.realpath(path))
    try:
        handle, temporary = _temporary(target.parent, target.name)
    except OSError as exc:
        if exc.errno is None:
            raise
        raise _naming(exc, path) from exc
    try:
        with os.fdopen(handle, "wb") as stream:
            with contextlib.suppress(FileNotFoundError):
                os.fchmod(stream.fileno(), stat.S_IMODE(os.stat(target).st_mode))
            write(stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, target)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        if isinstance(exc, OSError) and exc.errno is not None:
            raise _naming(exc, path) from exc
        raise


def write_tensors(path: str | os.PathLike[str], tensors: Mapping[str, npt.ArrayLike]) -> None:
    """Write a flat state dict atomically; the suffix decides the format.

    Parameters
    ----------
    path : str or path-like
        ``.npz``, ``.safetensors`` (needs the ``safetensors`` package) or
        ``.pth`` / ``.pt`` (needs PyTorch; a dict of tensors for
        ``load_state_dict``).
    tensors : mapping of str to array_like

    Raises
    ------
    ReparamError
        On an unknown suffix or a missing optional package (nothing is written).
    OSError
        If writing fails, naming ``path``; no partial file is left behind.
    """
    func = "save"
    file = Path(path)
    suffix = check_suffix(file, func=func, allowed=CHECKPOINT_SUFFIXES)
    arrays = {key: np.ascontiguousarray(value) for key, value in tensors.items()}
    if suffix == ".npz":

        def write(stream: IO[bytes]) -> None:
            # what numpy.savez writes, without its keyword arguments (a tensor may be named "file")
            with zipfile.ZipFile(stream, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
                for key, array in arrays.items():
                    with archive.open(f"{key}.npy", "w", force_zip64=True) as member:
                        np.lib.format.write_array(member, array, allow_pickle=False)

    elif suffix == ".safetensors":
        payload = _import_safetensors(func).save(arrays)

        def write(stream: IO[bytes]) -> None:
            stream.write(payload)

    else:
        torch = _import_torch(func)
        state = {key: torch.from_numpy(np.array(value)) for key, value in arrays.items()}

        def write(stream: IO[bytes]) -> None:
            buffer = _io.BytesIO()
            torch.save(state, buffer)
            stream.write(buffer.getvalue())

    write_atomic(file, write)


def save_array(path: str | os.PathLike[str], array: npt.ArrayLike) -> None:
    """Write one array to a ``.npy`` file atomically.

    Parameters
    ----------
    path : str or path-like
        Destination ending in ``.npy``.
    array : array_like
        Any shape, e.g. logits of shape (N, num_classes); saved without pickle.

    Raises
    ------
    ReparamError
        If the suffix is not ``.npy``.
    OSError
        If writing fails, naming ``path``; no partial file is left behind.
    """
    file = Path(path)
    check_suffix(file, func="save_array", allowed=(".npy",))
    data = np.asarray(array)
    write_atomic(file, lambda stream: np.save(stream, data, allow_pickle=False))
