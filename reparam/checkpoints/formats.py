"""Checkpoint files: read and write flat state dicts of arrays, atomically.

Formats, chosen by the file suffix: ``.npz`` (NumPy, no pickle),
``.safetensors`` (needs the ``safetensors`` package) and ``.pth`` / ``.pt``
(needs PyTorch; read with ``weights_only=True``). Every file is written
atomically: a temporary file in the same directory, ``fsync``, then
:func:`os.replace`. Nothing here knows what the tensors mean.
"""

from __future__ import annotations

import contextlib
import errno
import io as _io
import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO, Any

import numpy as np
import numpy.typing as npt

from ..core.errors import ReparamError

__all__ = [
    "CHECKPOINT_SUFFIXES",
    "Tensors",
    "check_suffix",
    "read_tensors",
    "save_array",
    "write_atomic",
    "write_tensors",
]

Tensors = dict[str, npt.NDArray[Any]]

CHECKPOINT_SUFFIXES = (".npz", ".safetensors", ".pth", ".pt")


def check_suffix(path: Path, *, func: str, allowed: tuple[str, ...]) -> str:
    suffix = path.suffix.lower()
    if suffix not in allowed:
        raise ReparamError(
            f"{func}: unknown file format {path.name!r}; got suffix {suffix or '(none)'!r}, "
            f"expected one of {', '.join(allowed)}"
        )
    return suffix


def _import_safetensors(func: str) -> Any:
    try:
        import safetensors.numpy
    except ImportError:
        raise ReparamError(
            f"{func}: reading and writing .safetensors needs the safetensors package; "
            "hint: pip install safetensors (or use .npz)"
        ) from None
    return safetensors.numpy


def _import_torch(func: str) -> Any:
    try:
        import torch
    except ImportError:
        raise ReparamError(
            f"{func}: .pth/.pt checkpoints are PyTorch pickles and need PyTorch to read; "
            "hint: pip install torch, or convert the checkpoint to .safetensors or .npz"
        ) from None
    return torch


def _unwrap(tensors: Mapping[str, Any]) -> dict[str, Any]:
    """Unwrap ``{"state_dict": ...}`` / ``{"model": ...}`` containers and a ``module.`` prefix."""
    current: Mapping[str, Any] = tensors
    while True:
        for wrapper in ("state_dict", "model"):
            inner = current.get(wrapper)
            if isinstance(inner, Mapping):
                current = inner
                break
        else:
            break
    if current and all(str(key).startswith("module.") for key in current):
        return {str(key).removeprefix("module."): value for key, value in current.items()}
    return {str(key): value for key, value in current.items()}


def _read_pytorch(path: Path, func: str) -> dict[str, Any]:
    torch = _import_torch(func)
    raw = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(raw, Mapping):
        raise ReparamError(
            f"{func}: {path.name} holds a {type(raw).__name__}; expected a state dict (a mapping "
            "of names to tensors)"
        )
    converted: dict[str, Any] = {}
    for key, value in _unwrap(raw).items():
        if isinstance(value, torch.Tensor):
            tensor = value.detach().cpu()
            if tensor.dtype == torch.bfloat16:
                tensor = tensor.float()
            converted[key] = tensor.numpy()
        else:
            converted[key] = value
    return converted


def read_tensors(path: str | os.PathLike[str]) -> dict[str, npt.NDArray[Any]]:
    """Read a flat state dict of arrays from ``.npz``, ``.safetensors``, ``.pth`` or ``.pt``.

    Parameters
    ----------
    path : str or path-like
        The checkpoint; the suffix decides the format.

    Returns
    -------
    dict of str to ndarray
        Containers (``state_dict``, ``model``) and a ``module.`` prefix removed.

    Raises
    ------
    ReparamError
        On an unknown suffix, a missing optional package, an entry that is not
        an array, or a file that cannot be parsed.
    OSError
        If the file cannot be opened (e.g. it does not exist).
    """
    func = "load"
    file = Path(path)
    suffix = check_suffix(file, func=func, allowed=CHECKPOINT_SUFFIXES)
    if not file.is_file():
        raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), str(file))
    try:
        if suffix == ".npz":
            with np.load(file, allow_pickle=False) as archive:
                raw: dict[str, Any] = {key: archive[key] for key in archive.files}
        elif suffix == ".safetensors":
            raw = dict(_import_safetensors(func).load_file(str(file)))
        else:
            raw = _read_pytorch(file, func)
    except (ReparamError, OSError):
        raise
    except Exception as exc:  # every parser has its own exception types
        raise ReparamError(
            f"{func}: cannot read {file.name} as {suffix} ({type(exc).__name__}: {exc}); "
            "hint: check that the file is complete and has the right suffix"
        ) from exc
    tensors = _unwrap(raw)
    bad = [key for key, value in tensors.items() if not isinstance(value, np.ndarray)]
    if bad:
        raise ReparamError(
            f"{func}: {file.name} has entries that are not tensors: {', '.join(bad[:5])}; "
            "expected a state dict of tensors only"
        )
    return {key: value for key, value in tensors.items() if isinstance(value, np.ndarray)}


def write_atomic(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    """Write through ``write`` into a temporary file next to ``path``, then rename it."""
    directory = path.parent if str(path.parent) else Path(".")
    handle, temporary = tempfile.mkstemp(dir=directory, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as stream:
            write(stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


def write_tensors(path: str | os.PathLike[str], tensors: Mapping[str, npt.ArrayLike]) -> None:
    """Write a flat state dict atomically; the suffix decides the format.

    Parameters
    ----------
    path : str or path-like
        ``.npz``, ``.safetensors`` or ``.pth`` / ``.pt`` (the last needs
        PyTorch and writes a dict of tensors for ``load_state_dict``).
    tensors : mapping of str to array_like

    Raises
    ------
    ReparamError
        On an unknown suffix or a missing optional package (nothing is written).
    OSError
        If writing fails; no partial file is left behind.
    """
    func = "save"
    file = Path(path)
    suffix = check_suffix(file, func=func, allowed=CHECKPOINT_SUFFIXES)
    arrays = {key: np.ascontiguousarray(value) for key, value in tensors.items()}
    if suffix == ".npz":

        def write(stream: IO[bytes]) -> None:
            np.savez(stream, **arrays)  # type: ignore[arg-type]

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
        If writing fails; no partial file is left behind.
    """
    file = Path(path)
    check_suffix(file, func="save_array", allowed=(".npy",))
    data = np.asarray(array)
    write_atomic(file, lambda stream: np.save(stream, data, allow_pickle=False))
