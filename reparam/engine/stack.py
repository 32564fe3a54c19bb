"""A fast inference path for the deploy form: a stack of 3x3 convolutions, each + bias + ReLU.

:func:`reparam.conv2d` is the general reference (any stride, dilation and groups,
NCHW in and out). :class:`DeployStack` handles only what a reparameterized
RepVGG is made of, 3x3 kernels with padding 1, stride 1 or 2, any groups, each
followed by its bias and a ReLU, and does it as fast as NumPy allows:

* activations stay NHWC between layers (the channel axis is the contiguous
  one, so every gathered row of a receptive field is a block copy); NCHW is
  converted once on the way in and once on the way out (an RGB stem gathers
  its columns straight from NCHW planes, which copy faster);
* every layer reads a zero-bordered padded buffer and writes its ReLU output
  straight into the interior of the next layer's padded buffer; all buffers
  are carved out of one allocation per input shape and reused, and every
  view on them (strided windows, scratch, output regions) is prepared once,
  so a forward pass is only NumPy calls on ready views;
* stride-2 layers, grouped layers and the stem use im2col (one strided view,
  one copy into a preallocated column buffer, one matrix multiply whose
  extra column of ones adds the bias);
* stride-1 layers use Winograd's minimal filtering F(2x2, 3x3) or F(4x4, 3x3)
  (Lavin & Gray, 2016): 16 (or 36) matrix products per tile instead of 9 per
  output pixel, 2.25x (or 4x) fewer multiply-adds. The kernel transforms are
  precomputed, in float64, when the stack is built; the input and output
  transforms are small matrix products too, over all tiles and channels;
* the batch is processed in chunks of images, so the extra memory is bounded
  by ``max_chunk_bytes`` whatever the batch size; within a chunk, layers with
  large images run a few images at a time (``layer_bytes``) so their scratch
  stays in cache;
* with ``threads > 1`` the stack owns the parallelism of a call: BLAS is
  pinned to one thread for its duration (with threadpoolctl, when installed;
  restored afterwards) and every layer is split into bands of output rows
  that the stack's threads compute side by side, each its own gather,
  transforms and matrix products (NumPy releases the GIL in all of them);
  by default the stack takes as many threads as BLAS has (at most 4) when
  threadpoolctl is installed; with ``threads=1`` BLAS's own threads share
  the products and everything else runs on one core;
* weights are held once: read-only kernels (a deploy model's) are shared,
  not copied; the transformed layouts are computed layer by layer straight
  into one allocation; layers with more output channels than output pixels
  read the kernel itself (im2col in the kernel's tap order).

``benchmarks/`` compares it with PyTorch on RepVGG-A0.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt

from ..core.checks import FloatArray, as_float_array, int_pair, positive_int
from ..core.errors import ReparamError
from . import workers
from .im2col import (
    gemm_nchw_shape,
    gemm_shape,
    gemm_weights,
    gemm_weights_nchw,
    im2col_nchw_task,
    im2col_split_tasks,
    im2col_task,
    kernel_shape,
    kernel_view,
    kernel_weights,
    reads_nchw,
)
from .layers import Layer, check_layer, output_size, winograd_allowed
from .memory import Arena, Pool
from .winograd import (
    tile_side,
    winograd_matrices,
    winograd_shape,
    winograd_task,
    winograd_weights,
)
from .workers import Workers

__all__ = [
    "ALGORITHMS",
    "DEFAULT_MAX_THREADS",
    "DeployStack",
    "choose_algorithm",
    "winograd_matrices",
]


class WeightLayout(NamedTuple):
    """How an algorithm lays out a layer's weights: the shape, how to fill it, or a view."""

    shape: Callable[[Layer], tuple[int, ...]]
    fill: Callable[[Layer, FloatArray], None]
    #: the layout as a view of the layer's own arrays (no copy), used when the dtype matches
    view: Callable[[Layer], FloatArray] | None = None


#: How each algorithm lays out a layer's weights, computed once when the stack is built,
#: straight into the one allocation that holds them all (``im2col_nchw`` is the first
#: layer's im2col read from NCHW planes). An algorithm is one module (im2col.py,
#: winograd.py) plus its entry here.
PREPARE_WEIGHTS: dict[str, WeightLayout] = {
    "im2col": WeightLayout(gemm_shape, gemm_weights),
    "im2col_nchw": WeightLayout(gemm_nchw_shape, gemm_weights_nchw),
    "im2col_kernel": WeightLayout(kernel_shape, kernel_weights, kernel_view),
    "winograd2": WeightLayout(partial(winograd_shape, tile=2), partial(winograd_weights, tile=2)),
    "winograd4": WeightLayout(partial(winograd_shape, tile=4), partial(winograd_weights, tile=4)),
}


#: The algorithms a layer can use; Winograd needs stride 1 and groups 1.
ALGORITHMS: tuple[str, ...] = ("im2col", "winograd2", "winograd4")


#: Above this many input channels, F(4x4, 3x3) is not used (float32 error, memory).
_WIDE = 256


#: F(4x4, 3x3) is used on images at least this large (see choose_algorithm).
_F4_SIDE = 24


#: ... or on smaller images when a chunk of images makes at least this many 4x4 tiles.
_F4_TILES = 128


#: Default bound on the scratch of one layer call (columns, Winograd tiles): large
#: layers then run a few images at a time on data that stays in cache.
DEFAULT_LAYER_BYTES = 8 * 2**20


#: Default bound on the buffers of one chunk of images (RepVGG-A0 at 224x224: 8 images,
#: 60 MiB; RepVGG-B1: 4 images).
DEFAULT_CHUNK_BYTES = 64 * 2**20


#: Most threads a stack takes by default (``threads=None``): the bands of a layer's rows
#: thin out with more (a 14x14 layer has 7 rows of 2x2 tiles), and this was measured on
#: 2 cores only.
DEFAULT_MAX_THREADS = 4


#: Largest chunk of images considered.
_MAX_CHUNK = 1 << 16


def choose_algorithm(
    *,
    in_channels: int,
    out_channels: int,
    stride: int,
    groups: int,
    height: int,
    width: int,
    images: int = 1,
) -> str:
    """Pick the algorithm of one layer, from speed and error measured on a 2-core AVX-512 CPU.

    Parameters
    ----------
    in_channels, out_channels : int
        The layer's channels.
    stride, groups : int
        The layer's stride and groups.
    height, width : int
        The layer's input size.
    images : int, default 1
        Images computed together (a chunk of the batch).

    Returns
    -------
    str
        ``"im2col"`` for strided or grouped layers (Winograd needs stride 1
        and one group), images under 4 pixels a side and fewer than 8 input
        channels (where the transforms cost more than they save);
        ``"winograd4"`` for at most 256 input channels and images of at least
        24 pixels a side, or smaller images of which ``images`` make at least
        128 tiles of 4x4 (8 images of 14x14); ``"winograd2"`` otherwise.

    Notes
    -----
    F(4x4, 3x3) does 4x fewer multiply-adds than a direct convolution and
    F(2x2, 3x3) 2.25x fewer, but F(4x4, 3x3) has 36 transformed kernels per
    input-output channel pair (F(2x2, 3x3) 16, im2col 9): on small images,
    where each kernel serves few tiles, streaming them from memory costs more
    than the multiply-adds saved (RepVGG-A0 at 224x224, measured layer by
    layer inside the whole stack: F(4x4, 3x3) is the fastest at 56x56 and
    28x28, F(2x2, 3x3) at 14x14 for one image). With many images per call
    each kernel serves enough tiles again: RepVGG-A0 with F(4x4, 3x3) at
    14x14 too, on the stack's 2 threads, took 88.7 ms instead of 94.9 at
    batch 8 and 174 instead of 189 at batch 16 (medians of 7 interleaved
    rounds), against 28.4 / 28.0 at batch 2, 49.2 / 47.9 at batch 4 and
    19.6 / 17.6 at batch 1. F(4x4, 3x3) also rounds worse: its float32
    error, relative to the output magnitude, grows with the channels summed
    (about 2e-6 at 16 channels, 4e-6 to 7e-6 at 192, 8e-6 at 640, against
    2e-7 to 6e-7 for F(2x2, 3x3) and im2col). All stay well inside the
    project's float32 tolerance of 2e-5; :meth:`DeployStack.tune` measures
    instead of assuming.
    """
    if stride != 1 or groups != 1 or min(height, width) < 4 or in_channels < 8:
        return "im2col"
    if in_channels > _WIDE:
        return "winograd2"
    tiles = images * -(-height // 4) * -(-width // 4)
    if min(height, width) >= _F4_SIDE or tiles >= _F4_TILES:
        return "winograd4"
    return "winograd2"


@dataclass(frozen=True)
class _Plan:
    """Buffers and geometry for one input shape, chunk size and dtype."""

    chunk: int
    dtype: np.dtype[Any]
    sizes: list[tuple[int, int]]  # input (H, W) of every layer, then the output size
    algorithms: list[str]
    steps: list[int]  # images per call of each layer
    nchw_input: bool  # the first layer reads an NCHW padded buffer (few input channels)
    buffers: list[FloatArray]  # NHWC input buffer of every layer, then the output buffer
    origins: list[int]  # where the image starts in each buffer (1: zero border, 0: none)
    arenas: list[Arena]  # scratch of each worker thread
    tasks: dict[tuple[int, int, int], list[list[Callable[[], None]]]] = field(default_factory=dict)


class DeployStack:
    """A stack of ``relu(conv3x3(x, kernel, stride, padding=1, groups) + bias)`` layers.

    Built once from the deploy-form layers (everything that depends only on
    the kernels is precomputed), then called on NCHW batches.

    Parameters
    ----------
    layers : iterable of (kernel, bias, stride, groups)
        ``kernel`` of shape ``(C_out, C_in // groups, 3, 3)``, ``bias`` of
        shape ``(C_out,)``, ``stride`` 1 or 2, ``groups`` dividing both
        channel counts. Each layer's ``C_in`` is the previous ``C_out``.
        Objects with ``kernel``, ``bias``, ``stride`` and ``groups``
        attributes (a deploy block) are accepted too. Read-only
        C-contiguous arrays (a deploy block's) are shared, not copied; others are
        copied.
    algorithms : sequence of str, optional
        One of :data:`ALGORITHMS` per layer, or None (the default) for
        :func:`choose_algorithm` per layer and input size. Winograd is used
        only where the layer allows it (stride 1, groups 1); elsewhere the
        request falls back to ``"im2col"``.
    max_chunk_bytes : int, default 64 MiB
        Bound on the buffers (padded activations, im2col columns, Winograd
        tiles) of one chunk of images; the batch is processed in chunks of as
        many images as fit (at least one), so the extra memory of a call does
        not grow with the batch (see :meth:`scratch_bytes`). The buffers are
        kept between calls with the same input shape.
    layer_bytes : int, default 8 MiB
        Bound on the scratch of one call of one layer: layers with large
        images run on a few images of the chunk at a time (at least one), so
        their im2col columns or Winograd tiles stay in cache, while layers
        with small images run on the whole chunk at once (larger, faster
        matrix products).
    input_size : int or (int, int), default 224
        The image size (height, width) to prepare the weights for when the
        stack is built; which layout a layer's weights need depends on the
        algorithm, which depends on the image size (see
        :func:`choose_algorithm`). Other sizes compute what they need on
        first use, once.
    threads : int, optional
        Threads of the stack's own. With more than one, each layer is split
        into that many bands of output rows (or, where the GEMM has fewer
        pixels than output channels, into gathers by rows, then products by
        output channels) computed side by side, while BLAS is pinned to one
        thread for the call with threadpoolctl (optional: without it,
        ``threads`` above 1 runs as 1, since BLAS's own threads and the
        stack's would compete for the cores). With 1, BLAS's own threads
        parallelize the matrix products only. None (the default): as many
        as BLAS's own threads (which follow ``OMP_NUM_THREADS`` /
        ``OPENBLAS_NUM_THREADS`` and the CPUs the process may use), at most
        :data:`DEFAULT_MAX_THREADS`, when threadpoolctl is installed; 1
        without it. On the 2-core machine of ``benchmarks/results/``, 2
        threads were 1.2-1.3x faster than 1 at batch 8 and about even at
        batch 1.

    Raises
    ------
    ReparamError
        If there are no layers, a kernel is not ``(O, I/g, 3, 3)``, a bias has
        the wrong length, a stride is not 1 or 2, groups do not divide the
        channels, consecutive layers' channels do not chain, an algorithm
        name is unknown, or ``max_chunk_bytes``, ``layer_bytes``, ``threads``
        or ``input_size`` is not a positive integer (pair).

    Notes
    -----
    The result equals the reference ``conv2d(x, kernel, bias, stride=s,
    padding=1, groups=g)`` followed by ``np.maximum(., 0)``, layer after
    layer, up to rounding: float64 to about 1e-14 relative, float32 to about
    5e-7 relative with im2col and F(2x2, 3x3), about 1e-6 to 8e-6 with
    F(4x4, 3x3) (its transforms have coefficients up to 8, and the error
    grows with the number of channels summed).

    The result dtype is ``np.result_type(x, kernels, biases)``, computed in at
    least float32 (float16 is computed in float32), like :func:`conv2d`.

    Calls are serialized by a lock (the buffers are shared); for parallel
    inference, build one stack per thread.

    Examples
    --------
    >>> import numpy as np
    >>> from reparam import conv2d
    >>> rng = np.random.default_rng(0)
    >>> layers = [(rng.standard_normal((4, 3, 3, 3)), rng.standard_normal(4), 2, 1),
    ...           (rng.standard_normal((4, 4, 3, 3)), rng.standard_normal(4), 1, 1)]
    >>> x = rng.standard_normal((2, 3, 9, 7))
    >>> y = x
    >>> for kernel, bias, stride, groups in layers:
    ...     y = np.maximum(conv2d(y, kernel, bias, stride=stride, padding=1, groups=groups), 0)
    >>> stack = DeployStack(layers)
    >>> bool(np.allclose(stack(x), y, rtol=0, atol=1e-12))
    True
    >>> stack(x, pool=True).shape
    (2, 4)
    """

    def __init__(
        self,
        layers: Iterable[Any],
        *,
        algorithms: Sequence[str] | None = None,
        max_chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        layer_bytes: int = DEFAULT_LAYER_BYTES,
        threads: int | None = None,
        input_size: int | tuple[int, int] = 224,
    ) -> None:
        func = "DeployStack"
        checked = [check_layer(i, entry, func=func) for i, entry in enumerate(layers)]
        if not checked:
            raise ReparamError(f"{func}: layers is empty; got 0 layers, expected at least 1")
        for i in range(1, len(checked)):
            if checked[i].in_channels != checked[i - 1].out_channels:
                raise ReparamError(
                    f"{func}: layer {i} does not chain; got C_in = {checked[i].in_channels}, "
                    f"expected {checked[i - 1].out_channels} (layer {i - 1}'s C_out)"
                )
        if algorithms is not None:
            algorithms = list(algorithms)
            if len(algorithms) != len(checked):
                raise ReparamError(
                    f"{func}: algorithms has the wrong length; got {len(algorithms)}, "
                    f"expected {len(checked)} (one per layer)"
                )
            for i, name in enumerate(algorithms):
                if name not in ALGORITHMS:
                    raise ReparamError(
                        f"{func}: unknown algorithm for layer {i}; got {name!r}, "
                        f"expected one of {ALGORITHMS}"
                    )
        self._layers = checked
        self._requested: list[str] | None = algorithms
        self._max_chunk_bytes = positive_int(max_chunk_bytes, func=func, name="max_chunk_bytes")
        self._layer_bytes = positive_int(layer_bytes, func=func, name="layer_bytes")
        if threads is None:
            threads = min(workers.blas_threads(), DEFAULT_MAX_THREADS)
        threads = positive_int(threads, func=func, name="threads")
        if workers.blas_controller() is None:
            threads = 1  # BLAS keeps its own threads, which the stack's would fight
        self._workers = Workers(threads)
        self.dtype: np.dtype[Any] = np.result_type(
            *{array.dtype for layer in checked for array in (layer.kernel, layer.bias)}
        )
        self._weights: dict[tuple[int, str, np.dtype[Any]], FloatArray] = {}
        self._plans: dict[tuple[int, int, int, np.dtype[Any]], _Plan] = {}
        self._lock = threading.Lock()
        # precompute the weights each layer uses at input_size; other forms (other
        # sizes, another dtype) are computed on first use and kept
        height, width = int_pair(input_size, func=func, name="input_size", minimum=1)
        compute = np.promote_types(self.dtype, np.float32)
        sizes, algorithms = self._geometry(height, width, 1)
        self._prepare([(i, self._form(i, sizes, algorithms), compute) for i in range(len(checked))])

    @property
    def in_channels(self) -> int:
        """Channels of the input."""
        return self._layers[0].in_channels

    @property
    def out_channels(self) -> int:
        """Channels of the output."""
        return self._layers[-1].out_channels

    @property
    def weight_bytes(self) -> int:
        """Bytes of the prepared weights (GEMM layouts, Winograd-transformed kernels)."""
        return sum(weights.nbytes for weights in self._weights.values())

    def __len__(self) -> int:
        return len(self._layers)

    def algorithms(self, height: int, width: int, images: int = 1) -> list[str]:
        """Return the algorithm each layer uses for ``images`` images of ``height x width``.

        ``images`` is the number computed together: the batch, or the chunk
        of it that ``max_chunk_bytes`` holds (see :func:`choose_algorithm`).
        """
        result = []
        for i, layer in enumerate(self._layers):
            if self._requested is not None:
                name = self._requested[i] if winograd_allowed(layer) else "im2col"
            else:
                name = choose_algorithm(
                    in_channels=layer.in_channels,
                    out_channels=layer.out_channels,
                    stride=layer.stride,
                    groups=layer.groups,
                    height=height,
                    width=width,
                    images=images,
                )
            result.append(name)
            height, width = output_size(height, layer.stride), output_size(width, layer.stride)
        return result

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """Output ``(H, W)`` for an input of ``height x width`` pixels."""
        for layer in self._layers:
            height, width = output_size(height, layer.stride), output_size(width, layer.stride)
        return height, width

    def __call__(self, x: npt.ArrayLike, *, pool: bool = False) -> FloatArray:
        """Run the stack on an NCHW batch.

        Parameters
        ----------
        x : array_like, shape (N, C_in, H, W)
            Input batch, ``N >= 0``, ``H, W >= 1``.
        pool : bool, default False
            Return the global average over the output pixels instead of the
            feature maps (no NCHW copy of the last activations is made).

        Returns
        -------
        ndarray, shape (N, C_out, H_out, W_out) or (N, C_out)
            New array of ``np.result_type(x, kernels, biases)``.

        Raises
        ------
        ReparamError
            If ``x`` is not a 4-D floating array with ``C_in`` channels and at
            least one pixel.
        """
        inputs, compute = self._check_input(x, func="DeployStack")
        batch, _, height, width = inputs.shape
        result_dtype = np.result_type(inputs.dtype, self.dtype)
        out_h, out_w = self.output_size(height, width)
        shape = (batch, self.out_channels) if pool else (batch, self.out_channels, out_h, out_w)
        output = np.empty(shape, dtype=result_dtype)
        if batch == 0:
            return output
        with self._lock, self.blas_scope():  # the buffers are shared: one call at a time
            plan = self._plan(height, width, compute, batch)
            for start in range(0, batch, plan.chunk):
                stop = min(batch, start + plan.chunk)
                last = self._run_chunk(plan, inputs[start:stop])
                if pool:
                    # the mean accumulates in float64 (cheap: one pass over the last layer)
                    output[start:stop] = last.mean(axis=(1, 2), dtype=np.float64)
                else:
                    np.copyto(output[start:stop], last.transpose(0, 3, 1, 2), casting="unsafe")
        return output

    def profile(self, x: npt.ArrayLike) -> list[tuple[str, float]]:
        """Time one forward pass layer by layer (for benchmarks).

        Parameters
        ----------
        x : array_like, shape (N, C_in, H, W)
            Input batch; it is run in chunks as by :meth:`__call__`.

        Returns
        -------
        list of (str, float)
            Per layer, its algorithm and the seconds it took, summed over
            chunks. The layout conversions at the edges are not included.
        """
        inputs, compute = self._check_input(x, func="DeployStack.profile")
        seconds = [0.0] * len(self._layers)
        with self._lock, self.blas_scope():
            plan = self._plan(inputs.shape[2], inputs.shape[3], compute, inputs.shape[0])
            for start in range(0, inputs.shape[0], plan.chunk):
                self._run_chunk(plan, inputs[start : start + plan.chunk], seconds)
        return list(zip(plan.algorithms, seconds, strict=True))

    def tune(self, x: npt.ArrayLike, *, repeats: int = 3) -> list[str]:
        """Time every algorithm on every layer for ``x``'s shape and keep the fastest.

        Parameters
        ----------
        x : array_like, shape (N, C_in, H, W)
            A representative batch (its shape and dtype matter, not its values).
        repeats : int, default 3
            Timed forward passes per algorithm; the minimum per layer counts.

        Returns
        -------
        list of str
            The algorithm now used by each layer (for every input shape, as if
            passed as ``algorithms=``).

        Notes
        -----
        Candidates are the algorithms a layer allows, minus F(4x4, 3x3) above
        256 input channels (its float32 error, see :func:`choose_algorithm`).
        The choice depends on timings, so on the machine and its load; every
        candidate agrees with the reference within the tolerance.
        """
        repeats = positive_int(repeats, func="DeployStack.tune", name="repeats")
        best: list[tuple[float, str]] = [(float("inf"), "im2col")] * len(self._layers)
        for name in ALGORITHMS:
            self._requested = [name] * len(self._layers)
            self._plans.clear()
            for _ in range(repeats):
                for i, (used, seconds) in enumerate(self.profile(x)):
                    allowed = used == name and not (
                        name == "winograd4" and self._layers[i].in_channels > _WIDE
                    )
                    if allowed and seconds < best[i][0]:
                        best[i] = (seconds, name)
        chosen = [name for _, name in best]
        self._requested = chosen
        self._plans.clear()
        compute = np.promote_types(self.dtype, np.float32)
        kept = [  # the chosen forms (and the im2col variants), drop the others
            key for key in self._weights if key[1] == chosen[key[0]] or key[1].startswith("im2col")
        ]
        self._weights = {key: weights for key, weights in self._weights.items() if key in kept}
        self._prepare([key for key in kept if key[2] == compute])  # into one block again
        return list(chosen)

    def scratch_bytes(
        self,
        height: int,
        width: int,
        *,
        batch: int | None = None,
        dtype: npt.DTypeLike | None = None,
    ) -> int:
        """Bytes of the buffers one call keeps for inputs of ``height x width`` pixels.

        Parameters
        ----------
        height, width : int
            Input size.
        batch : int, optional
            Batch size; None for the largest chunk ``max_chunk_bytes`` allows.
        dtype : dtype, optional
            Input dtype; None for the stack's own.

        Returns
        -------
        int
            Bytes of the padded activations and the scratch of one chunk of
            images: the extra memory of a call, whatever the batch size.
        """
        compute = np.promote_types(np.result_type(self.dtype, dtype or self.dtype), np.float32)
        return self._chunk_bytes(height, width, compute, self._chunk(height, width, compute, batch))

    # ------------------------------------------------------------------ internals

    def _check_input(self, x: npt.ArrayLike, *, func: str) -> tuple[FloatArray, np.dtype[Any]]:
        """Check ``x`` (floating, NCHW, C_in channels, pixels); return it and the compute dtype."""
        inputs = as_float_array(x, func=func, name="x", ndim=4)
        _, channels, height, width = inputs.shape
        if channels != self.in_channels:
            raise ReparamError(
                f"{func}: x has the wrong number of channels; got x.shape[1]={channels}, "
                f"expected {self.in_channels} (hint: x is NCHW)"
            )
        if height < 1 or width < 1:
            raise ReparamError(
                f"{func}: x has no pixels; got H x W = {height} x {width}, expected both >= 1"
            )
        return inputs, np.promote_types(np.result_type(inputs.dtype, self.dtype), np.float32)

    def blas_scope(self) -> contextlib.AbstractContextManager[Any]:
        """Return a ``with`` block in which BLAS runs as the stack's calls need it.

        With ``threads > 1``, BLAS is pinned to one thread in the block
        (restored at its end); otherwise nothing changes. Every call pins
        BLAS for itself; run the code around a call in the block too (a
        classifier head after ``stack(x, pool=True)``): a BLAS product on
        several threads leaves BLAS's helper threads spinning idle for a
        while (OpenBLAS: about 0.1 s), on the cores the stack's threads need.

        Examples
        --------
        >>> import numpy as np
        >>> stack = DeployStack([(np.ones((4, 3, 3, 3)), np.zeros(4), 1, 1)], threads=2)
        >>> head = np.ones((4, 2))
        >>> with stack.blas_scope():
        ...     logits = stack(np.ones((1, 3, 5, 5)), pool=True) @ head
        >>> logits.shape
        (1, 2)
        """
        if self._workers.threads > 1:
            return workers.one_blas_thread()
        return contextlib.nullcontext()

    def _prepare(self, keys: list[tuple[int, str, np.dtype[Any]]]) -> None:
        """Compute the weights of ``keys`` straight into one allocation, layer after layer.

        One block (the weights stream layer after layer), filled in place: no
        weight is held twice, not even for a moment (RepVGG-B1: 334 MiB of
        Winograd kernels, and before, as much again while they were copied in).
        """
        pending = []
        for key in keys:
            index, name, dtype = key
            view = PREPARE_WEIGHTS[name].view
            if view is not None and self._layers[index].kernel.dtype == dtype:
                self._weights[key] = view(self._layers[index])  # shared: nothing held twice
            else:
                pending.append(key)
        keys = pending
        layouts = [PREPARE_WEIGHTS[name] for _, name, _ in keys]
        shapes = [
            layout.shape(self._layers[i]) for (i, _, _), layout in zip(keys, layouts, strict=True)
        ]
        pools: dict[np.dtype[Any], Pool] = {}
        for dtype in {key[2] for key in keys}:
            sizes = [
                int(np.prod(s)) for s, key in zip(shapes, keys, strict=True) if key[2] == dtype
            ]
            pools[dtype] = Pool(sizes, dtype)
        for key, layout, shape in zip(keys, layouts, shapes, strict=True):
            index, _, dtype = key
            weights = pools[dtype].take(shape, zero=False)
            layout.fill(self._layers[index], weights)
            self._weights[key] = weights

    def _form(self, index: int, sizes: list[tuple[int, int]], algorithms: list[str]) -> str:
        """Name the weight layout layer ``index`` reads: its algorithm's, or an im2col variant.

        ``im2col_nchw`` for a first layer read from NCHW planes (an RGB stem);
        ``im2col_kernel`` (the kernel itself, :func:`kernel_view`) for one-group
        layers with more than 4 output channels per output pixel, whose
        weights outweigh their columns; ``im2col`` otherwise.
        """
        layer, algorithm = self._layers[index], algorithms[index]
        if algorithm != "im2col":
            return algorithm
        if index == 0 and reads_nchw(layer, algorithm):
            return "im2col_nchw"
        oh, ow = sizes[index + 1]
        if layer.groups == 1 and layer.out_channels > 4 * oh * ow:
            return "im2col_kernel"
        return "im2col"

    def _layer_weights(self, index: int, name: str, dtype: np.dtype[Any]) -> FloatArray:
        key = (index, name, dtype)
        weights = self._weights.get(key)
        if weights is None:  # another size or dtype: computed on first use, kept
            layout = PREPARE_WEIGHTS[name]
            if layout.view is not None and self._layers[index].kernel.dtype == dtype:
                weights = layout.view(self._layers[index])
            else:
                weights = np.empty(layout.shape(self._layers[index]), dtype=dtype)
                layout.fill(self._layers[index], weights)
            self._weights[key] = weights
        return weights

    def _chunk(self, height: int, width: int, dtype: np.dtype[Any], batch: int | None) -> int:
        """Images per chunk: as many as ``max_chunk_bytes`` holds, at least 1, at most ``batch``.

        The buffers of a chunk are not proportional to its images (the scratch
        of a layer call is bounded by ``layer_bytes``), so the largest chunk
        that fits is searched for: doubling, then bisecting.
        """
        limit = _MAX_CHUNK if batch is None else max(1, min(batch, _MAX_CHUNK))
        key = (height, width, dtype)

        def fits(chunk: int) -> bool:
            return self._chunk_bytes(*key, chunk) <= self._max_chunk_bytes

        low = 1
        while low < limit and fits(min(2 * low, limit)):
            low = min(2 * low, limit)
        high = min(2 * low, limit)  # low fits (or is 1), high does not (or is low)
        while high - low > 1:
            middle = (low + high) // 2
            low, high = (middle, high) if fits(middle) else (low, middle)
        return low

    def _plan(self, height: int, width: int, dtype: np.dtype[Any], batch: int | None) -> _Plan:
        chunk = self._chunk(height, width, dtype, batch)
        key = (height, width, chunk, dtype)
        plan = self._plans.get(key)
        if plan is None:
            self._plans.clear()  # keep the buffers of one shape only
            plan = self._make_plan(height, width, dtype, chunk)
            self._plans[key] = plan
        return plan

    def _geometry(
        self, height: int, width: int, images: int
    ) -> tuple[list[tuple[int, int]], list[str]]:
        sizes = [(height, width)]
        for layer in self._layers:
            h, w = sizes[-1]
            sizes.append((output_size(h, layer.stride), output_size(w, layer.stride)))
        return sizes, self.algorithms(height, width, images)

    def _buffer_shape(
        self, index: int, sizes: list[tuple[int, int]], algorithms: list[str]
    ) -> tuple[int, int, int]:
        """``(rows, columns, origin)`` of buffer ``index``: the input of that layer, or the output.

        An input buffer has a zero border (``origin`` 1) and, for a Winograd
        reader, room for whole tiles; a buffer written by a Winograd layer also
        has room for the whole tiles it writes (re-zeroed beyond the image).
        """
        h, w = sizes[index]
        origin = 1 if index < len(self._layers) else 0
        rows, cols = h + 2 * origin, w + 2 * origin
        if index < len(self._layers) and algorithms[index] != "im2col":
            tile = tile_side(algorithms[index])
            rows, cols = max(rows, -(-h // tile) * tile + 2), max(cols, -(-w // tile) * tile + 2)
        if index > 0 and algorithms[index - 1] != "im2col":
            tile = tile_side(algorithms[index - 1])
            rows = max(rows, origin + -(-h // tile) * tile)
            cols = max(cols, origin + -(-w // tile) * tile)
        return rows, cols, origin

    def _steps(
        self, sizes: list[tuple[int, int]], algorithms: list[str], chunk: int, itemsize: int
    ) -> list[int]:
        """Images per call of each layer: as many as ``layer_bytes`` of scratch hold (>= 1)."""
        steps = []
        for i, layer in enumerate(self._layers):
            per_image = sum(scratch_sizes(layer, sizes[i], algorithms[i], 1).values())
            fit = self._layer_bytes // max(1, per_image * itemsize)
            steps.append(max(1, min(chunk, fit)))
        return steps

    def _bands(self, rows: int, tile: int) -> list[tuple[int, int]]:
        """Output row ranges, whole tiles each, that the worker threads compute side by side."""
        tile_rows = -(-rows // tile)
        return [
            (start * tile, min(rows, stop * tile))
            for start, stop in self._workers.parts(tile_rows, workers.PARALLEL_ELEMENTS)
        ]

    def _by_channels(self, index: int, size: tuple[int, int], images: int) -> bool:
        """Whether an im2col layer's GEMM is split by output channels rather than by rows.

        When it has fewer rows (output pixels) than output channels per group:
        split by rows, every thread would stream all of the weights.
        """
        layer = self._layers[index]
        pixels = images * size[0] * size[1]
        first_nchw = index == 0 and reads_nchw(layer, "im2col")
        return (
            self._workers.threads > 1
            and not first_nchw
            and pixels < layer.out_channels // layer.groups
        )

    def _scratch(
        self, sizes: list[tuple[int, int]], algorithms: list[str], steps: list[int]
    ) -> list[dict[str, int]]:
        """Elements of each scratch buffer of each worker's arena."""
        arenas: list[dict[str, int]] = [{} for _ in range(self._workers.threads)]
        for i, layer in enumerate(self._layers):
            h, w = sizes[i]
            oh, ow = output_size(h, layer.stride), output_size(w, layer.stride)
            if algorithms[i] == "im2col" and self._by_channels(i, (oh, ow), steps[i]):
                needs = [scratch_sizes(layer, (h, w), "im2col", steps[i])]  # shared by all
            elif algorithms[i] == "im2col":  # a band of output rows per worker
                needs = [
                    scratch_sizes(
                        layer, ((stop - start - 1) * layer.stride + 1, w), "im2col", steps[i]
                    )
                    for start, stop in self._bands(oh, 1)
                ]
            else:
                tile = 2 if algorithms[i] == "winograd2" else 4
                needs = [
                    scratch_sizes(layer, (stop - start, w), algorithms[i], steps[i])
                    for start, stop in self._bands(h, tile)
                ]
            for arena, need in zip(arenas, needs, strict=False):
                for name, size in need.items():
                    arena[name] = max(arena.get(name, 0), size)
        return arenas

    def _chunk_bytes(self, height: int, width: int, dtype: np.dtype[Any], chunk: int) -> int:
        """Bytes of the buffers of a chunk of ``chunk`` images (what :meth:`_make_plan` makes)."""
        sizes, algorithms = self._geometry(height, width, chunk)
        steps = self._steps(sizes, algorithms, chunk, dtype.itemsize)
        shapes, _, slots = self._buffers(sizes, algorithms, chunk)
        total = sum(int(np.prod(shapes[first])) for first in _firsts(slots))
        scratch = sum(sum(arena.values()) for arena in self._scratch(sizes, algorithms, steps))
        return (total + scratch) * dtype.itemsize

    def _buffers(
        self, sizes: list[tuple[int, int]], algorithms: list[str], chunk: int
    ) -> tuple[list[tuple[int, int, int, int]], list[int], list[int]]:
        """``(shapes, origins, slots)`` of every layer's input buffer, then the output's.

        Buffers of the same geometry (image size, border, room for tiles,
        channels, layout) alternate between two arrays: layer ``i`` reads one
        and writes the other, so a stage of identical layers needs two buffers,
        not one per layer. Everything outside an image stays zero whoever
        writes it (im2col writes only the image; Winograd zeroes again what its
        whole tiles write beyond it), so sharing keeps the zero borders.
        ``slots[i]`` is the array buffer ``i`` uses, named by the first buffer
        using it.
        """
        nchw_input = reads_nchw(self._layers[0], algorithms[0])
        shapes: list[tuple[int, int, int, int]] = []
        origins: list[int] = []
        slots: list[int] = []
        free: dict[tuple[Any, ...], list[int]] = {}
        for i in range(len(self._layers) + 1):
            rows, cols, origin = self._buffer_shape(i, sizes, algorithms)
            shape = (chunk, rows, cols, self._channels(i))
            if i == 0 and nchw_input:
                shape = (chunk, self._channels(i), rows, cols)
            shapes.append(shape)
            origins.append(origin)
            key = (shape, origin, sizes[i], i == 0 and nchw_input)
            candidates = [slot for slot in free.get(key, []) if not slots or slot != slots[-1]]
            if candidates:
                slots.append(candidates[0])
            else:
                free.setdefault(key, []).append(i)
                slots.append(i)
        return shapes, origins, slots

    def _channels(self, index: int) -> int:
        """Channels of buffer ``index`` (the input of that layer, or the output)."""
        if index < len(self._layers):
            return self._layers[index].in_channels
        return self._layers[-1].out_channels

    def _make_plan(self, height: int, width: int, dtype: np.dtype[Any], chunk: int) -> _Plan:
        sizes, algorithms = self._geometry(height, width, chunk)
        steps = self._steps(sizes, algorithms, chunk, dtype.itemsize)
        shapes, origins, slots = self._buffers(sizes, algorithms, chunk)
        nchw_input = reads_nchw(self._layers[0], algorithms[0])
        scratch = self._scratch(sizes, algorithms, steps)
        # one allocation for everything (one region NumPy asks the kernel to back with huge
        # pages; fixed, cache-friendly offsets instead of wherever the allocator puts them)
        firsts = _firsts(slots)
        sizes_all = [int(np.prod(shapes[first])) for first in firsts]
        sizes_all += [size for needs in scratch for size in needs.values()]
        pool = Pool(sizes_all, dtype)
        arrays = {first: pool.take(shapes[first], zero=True) for first in firsts}
        buffers = [arrays[slot] for slot in slots]
        arenas = []
        for needs in scratch:
            arena = Arena(dtype)
            for name, size in needs.items():
                arena.slots[name] = pool.take((size,), zero=False)
            arenas.append(arena)
        return _Plan(chunk, dtype, sizes, algorithms, steps, nchw_input, buffers, origins, arenas)

    def _tasks(
        self, plan: _Plan, index: int, start: int, stop: int
    ) -> list[list[Callable[[], None]]]:
        """Return the prepared calls computing layer ``index`` for images ``start:stop``.

        Phases of tasks: the tasks of a phase run side by side on the workers,
        and each phase finishes before the next starts.

        Every view (strided windows, scratch, output regions) is made once per
        plan and kept, so a forward pass is only NumPy calls on ready views.
        """
        key = (index, start, stop)
        phases = plan.tasks.get(key)
        if phases is not None:
            return phases
        layer, algorithm = self._layers[index], plan.algorithms[index]
        source = plan.buffers[index][start:stop]
        target = plan.buffers[index + 1][start:stop]
        origin = plan.origins[index + 1]
        oh, ow = plan.sizes[index + 1]
        interior = target[:, origin : origin + oh, origin : origin + ow]
        form = self._form(index, plan.sizes, plan.algorithms)
        if algorithm == "im2col":
            weights = self._layer_weights(index, form, plan.dtype)
            bias = layer.bias.astype(plan.dtype) if form == "im2col_kernel" else None
        if algorithm == "im2col" and self._by_channels(index, (oh, ow), stop - start):
            gathers, products = im2col_split_tasks(
                source, weights, layer, interior, plan.arenas[0], self._workers.threads, bias
            )
            phases = [gathers, products]
        elif form == "im2col_nchw":
            phases = [
                [
                    im2col_nchw_task(source, weights, layer, interior, band, plan.arenas[k])
                    for k, band in enumerate(self._bands(oh, 1))
                ]
            ]
        elif algorithm == "im2col":  # the workers take a band of output rows each
            phases = [
                [
                    im2col_task(source, weights, layer, interior, band, plan.arenas[k], bias)
                    for k, band in enumerate(self._bands(oh, 1))
                ]
            ]
        else:  # Winograd: a band of whole tiles each
            tile = tile_side(algorithm)
            weights = self._layer_weights(index, algorithm, plan.dtype)
            bias = layer.bias.astype(plan.dtype)
            tasks = [
                winograd_task(
                    source, weights, bias, target, origin, (top, bottom), ow, plan.arenas[k], tile
                )
                for k, (top, bottom) in enumerate(self._bands(oh, tile))
            ]
            phases = [tasks]
        plan.tasks[key] = phases
        return phases

    def _run_chunk(
        self, plan: _Plan, x: FloatArray, seconds: list[float] | None = None
    ) -> FloatArray:
        n = x.shape[0]
        h, w = plan.sizes[0]
        first = plan.buffers[0][:n]
        if plan.nchw_input:
            self._workers.copyto(first[:, :, 1 : h + 1, 1 : w + 1], x, axis=1)
        else:
            self._workers.copyto(first[:, 1 : h + 1, 1 : w + 1], x.transpose(0, 2, 3, 1), axis=1)
        for i in range(len(self._layers)):
            started = time.perf_counter()
            step = plan.steps[i]
            for start in range(0, n, step):  # large layers a few images at a time
                for phase in self._tasks(plan, i, start, min(n, start + step)):
                    self._workers.run(phase)
            if seconds is not None:
                seconds[i] += time.perf_counter() - started
        out_h, out_w = plan.sizes[-1]
        return plan.buffers[-1][:n, :out_h, :out_w]


def _firsts(slots: list[int]) -> list[int]:
    """Return the distinct arrays of :meth:`DeployStack._buffers`' slots, in order."""
    return sorted(set(slots))


def scratch_sizes(
    layer: Layer, size: tuple[int, int], algorithm: str, chunk: int
) -> dict[str, int]:
    """Elements of each shared scratch buffer one layer needs."""
    h, w = size
    if algorithm == "im2col":
        oh, ow = output_size(h, layer.stride), output_size(w, layer.stride)
        rows = chunk * oh * ow
        taps = 9 * layer.in_channels // layer.groups + 1
        return {"columns": rows * taps * layer.groups, "product": rows * layer.out_channels}
    tile = 2 if algorithm == "winograd2" else 4
    side = tile + 2
    th, tw = -(-h // tile), -(-w // tile)
    tiles = chunk * th * tw
    channels, out_channels = layer.in_channels, layer.out_channels
    return {  # see winograd_task: d, v, z share one slot; e, m, y the other
        "gathered": tiles * max(side * side * channels, side * tile * out_channels),
        "product": tiles * max(side * side * channels, side * side * out_channels),
    }
