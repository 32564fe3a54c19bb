"""The stack's own threads: each layer split into parts that run side by side."""

from __future__ import annotations

import contextlib
import importlib
import os
import threading
import weakref
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import numpy as np

from ..core.checks import FloatArray

__all__ = [
    "PARALLEL_ELEMENTS",
    "Workers",
    "blas_controller",
    "blas_threads",
    "one_blas_thread",
    "take",
]


#: Copies smaller than this many elements are not worth splitting across threads.
PARALLEL_ELEMENTS = 1 << 15


class Workers:
    """Threads of the stack's own, handed work by locks.

    Work is split along an axis into ``threads`` parts; the calling thread
    does the first part and each helper thread one other. NumPy releases the
    GIL inside matrix products, ufuncs and copies, so the parts run side by
    side. A hand-off is one lock released and one acquired per helper: a
    round trip of about 5 us between threads that are awake, against 78 us
    for a ``concurrent.futures`` pool (2-core VM). Waking a thread whose
    core has gone idle costs more, 30-50 us on that VM, whatever the
    mechanism: a layer is one parallel section, not several. The helpers
    are daemon threads, started on first use and stopped when the Workers
    object is collected.
    """

    def __init__(self, threads: int) -> None:
        self.threads = threads
        self._helpers: list[_Helper] = []
        self._pid = os.getpid()  # a forked child has none of the parent's helper threads

    def run(self, tasks: Sequence[Callable[[], object]]) -> None:
        """Run the tasks side by side: the first on the calling thread, one per helper.

        Raises the first exception a task raised, after every task has ended.
        """
        if self.threads <= 1 or len(tasks) <= 1:
            for task in tasks:
                task()
            return
        if len(tasks) > self.threads:
            raise ValueError(f"Workers.run: {len(tasks)} tasks for {self.threads} threads")
        if os.getpid() != self._pid:  # forked: the helpers' threads did not come along
            self._helpers, self._pid = [], os.getpid()
        while len(self._helpers) < len(tasks) - 1:
            helper = _Helper()
            weakref.finalize(self, helper.stop)
            self._helpers.append(helper)
        for helper, task in zip(self._helpers, tasks[1:], strict=False):
            helper.start(task)
        try:
            tasks[0]()
        finally:
            errors = [helper.wait() for helper in self._helpers[: len(tasks) - 1]]
        for error in errors:
            if error is not None:
                raise error

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


class _Helper:
    """One daemon thread that runs one task at a time, handed over by two locks."""

    def __init__(self) -> None:
        self._go = threading.Lock()
        self._done = threading.Lock()
        self._go.acquire()
        self._done.acquire()
        self._box: list[Any] = [None, None]  # [task, error]
        # the thread holds only the locks and the box, never the Workers object
        threading.Thread(
            target=_serve, args=(self._go, self._done, self._box), daemon=True, name="reparam"
        ).start()

    def start(self, task: Callable[[], object]) -> None:
        """Hand ``task`` to the thread."""
        self._box[0] = task
        self._box[1] = None
        self._go.release()

    def wait(self) -> BaseException | None:
        """Wait for the task to end; return what it raised, if anything."""
        self._done.acquire()
        error: BaseException | None = self._box[1]
        self._box[0] = self._box[1] = None
        return error

    def stop(self) -> None:
        """End the thread (it is waiting for a task when this is called)."""
        self._box[0] = None
        self._go.release()


def _serve(go: threading.Lock, done: threading.Lock, box: list[Any]) -> None:
    """Serve tasks on a helper thread: wait for one, run it, report; a None task ends it."""
    while True:
        go.acquire()
        task = box[0]
        if task is None:
            return
        try:
            task()
        except BaseException as exc:  # handed to the calling thread, raised there
            box[1] = exc
        done.release()


def take(array: FloatArray, axis: int, start: int, stop: int) -> FloatArray:
    """Return ``array[..., start:stop, ...]`` along ``axis`` (a view)."""
    index: list[slice] = [slice(None)] * array.ndim
    index[axis] = slice(start, stop)
    return array[tuple(index)]


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


def blas_threads() -> int:
    """Threads the loaded BLAS libraries use now (the most of them); 1 if not known.

    Without threadpoolctl the count is not known, and 1 is returned: the
    stack then leaves the parallelism to BLAS.
    """
    controller = blas_controller()
    if controller is None:
        return 1
    counts = [int(lib.num_threads) for lib in controller.select(user_api="blas").lib_controllers]
    return max([1, *counts])


def one_blas_thread() -> contextlib.AbstractContextManager[Any]:
    """BLAS pinned to one thread for the ``with`` block, restored afterwards (if controllable)."""
    controller = blas_controller()
    if controller is None:
        return contextlib.nullcontext()
    limiter: contextlib.AbstractContextManager[Any] = controller.limit(limits=1, user_api="blas")
    return limiter
