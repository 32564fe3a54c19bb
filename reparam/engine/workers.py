"""Threads for the single-threaded NumPy passes (copies, ReLU) between the BLAS calls."""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any

import numpy as np

from ..core.checks import FloatArray

__all__ = [
    "PARALLEL_ELEMENTS",
    "SERIAL",
    "Workers",
    "blas_controller",
    "one_blas_thread",
    "relu",
    "take",
]


#: Copies smaller than this many elements are not worth splitting across threads.
PARALLEL_ELEMENTS = 1 << 15


class Workers:
    """Threads for the copies NumPy runs on one core (it releases the GIL inside them).

    BLAS already spreads each matrix product over the cores; the gathers and
    the ReLU scatters between them would otherwise run on one. Work is split
    along an axis into ``threads`` parts; the calling thread does one part.
    """

    def __init__(self, threads: int) -> None:
        self.threads = threads
        self._pool: ThreadPoolExecutor | None = None

    def run(self, tasks: Sequence[Callable[[], object]]) -> None:
        """Run the tasks, the first on the calling thread, the others on the pool."""
        if self.threads <= 1 or len(tasks) <= 1:
            for task in tasks:
                task()
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.threads - 1, thread_name_prefix="reparam")
        futures = [self._pool.submit(task) for task in tasks[1:]]
        tasks[0]()
        for future in futures:
            future.result()

    def parts(self, length: int, size: int) -> list[tuple[int, int]]:
        """``[start, stop)`` ranges splitting ``length`` for an array of ``size`` elements."""
        count = min(self.threads, length) if size >= PARALLEL_ELEMENTS else 1
        bounds = [length * k // count for k in range(count + 1)]
        return [(bounds[k], bounds[k + 1]) for k in range(count) if bounds[k] < bounds[k + 1]]

    def copyto(self, out: FloatArray, source: FloatArray, *, axis: int) -> None:
        """``np.copyto(out, source)``, split along ``axis``."""
        self.run(
            [
                partial(np.copyto, take(out, axis, a, b), take(source, axis, a, b), "unsafe")
                for a, b in self.parts(out.shape[axis], out.size)
            ]
        )

    def relu(self, out: FloatArray, source: FloatArray, *, axis: int) -> None:
        """``np.maximum(source, 0, out=out)``, split along ``axis``."""
        self.run(
            [
                partial(relu, take(out, axis, a, b), take(source, axis, a, b))
                for a, b in self.parts(out.shape[axis], out.size)
            ]
        )


SERIAL = Workers(1)


def take(array: FloatArray, axis: int, start: int, stop: int) -> FloatArray:
    """Return ``array[..., start:stop, ...]`` along ``axis`` (a view)."""
    index: list[slice] = [slice(None)] * array.ndim
    index[axis] = slice(start, stop)
    return array[tuple(index)]


def relu(out: FloatArray, source: FloatArray) -> None:
    """Write ``max(source, 0)`` into ``out``."""
    np.maximum(source, 0, out=out)


_CONTROLLER: list[Any] = []  # threadpoolctl.ThreadpoolController, made on first use


def blas_controller() -> Any:
    """Return threadpoolctl's controller of the loaded BLAS libraries (None if not installed).

    threadpoolctl is optional (reparam depends on NumPy only): without it the
    stack cannot pin BLAS to one thread, so it leaves the parallelism to BLAS.
    The controller is made once (it scans the loaded libraries) and reused.
    """
    if not _CONTROLLER:
        try:
            module = importlib.import_module("threadpoolctl")
        except ImportError:
            _CONTROLLER.append(None)
        else:
            _CONTROLLER.append(module.ThreadpoolController())
    return _CONTROLLER[0]


def one_blas_thread() -> contextlib.AbstractContextManager[Any]:
    """BLAS pinned to one thread for the ``with`` block, restored afterwards (if controllable)."""
    controller = blas_controller()
    if controller is None:
        return contextlib.nullcontext()
    limiter: contextlib.AbstractContextManager[Any] = controller.limit(limits=1, user_api="blas")
    return limiter
