"""Folding BatchNorm into convolutions and summing parallel branches: the RepVGG algebra."""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from .algebra import Conv, Node, Norm, Parallel, Sequential, fold
from .checks import FloatArray, as_float_array, bias_vector, groups_divide, positive_int
from .conv import centred_padding
from .errors import ReparamError
from .params import BatchNorm, ConvBias

__all__ = ["fuse_block", "fuse_bn", "repvgg_tree", "sum_branches"]


def _working_dtype(dtype: np.dtype[Any]) -> np.dtype[Any]:
    """float64, or the input dtype when it is wider (long double)."""
    return np.promote_types(dtype, np.float64)


def _check_batch_norm(bn: Any, *, func: str, name: str, channels: int, what: str) -> BatchNorm:
    if not isinstance(bn, BatchNorm):
        raise ReparamError(
            f"{func}: {name} must be a reparam.BatchNorm; got {type(bn).__name__} "
            "(hint: BatchNorm(gamma, beta, mean, var, eps=...))"
        )
    if bn.channels != channels:
        raise ReparamError(
            f"{func}: {name} has {bn.channels} channels; got {bn.channels}, expected {channels} "
            f"(the {what})"
        )
    return bn


def fuse_bn(
    kernel: npt.ArrayLike, bn: BatchNorm, *, conv_bias: npt.ArrayLike | None = None
) -> ConvBias:
    """Fold an inference BatchNorm into the convolution before it.

    Parameters
    ----------
    kernel : array_like, shape (C_out, C_in // groups, kH, kW)
        The convolution's weights.
    bn : BatchNorm
        The BatchNorm applied to the convolution's output, ``C_out`` channels.
    conv_bias : array_like, shape (C_out,), optional
        The convolution's own bias, if it has one.

    Returns
    -------
    ConvBias
        ``(kernel, bias)`` with the input kernel's shape and ``bias`` of shape
        ``(C_out,)``, in ``np.result_type`` of the inputs.

    Raises
    ------
    ReparamError
        If the kernel is not a 4-D floating array, ``bn`` is not a
        :class:`BatchNorm` of ``C_out`` channels, or ``conv_bias`` has the
        wrong length.

    Notes
    -----
    With ``s = gamma / sqrt(var + eps)`` (one value per output channel ``o``),
    ``bn(conv(x) + c) = s * (conv(x) + c - mean) + beta``, which is
    ``conv'(x) + b'`` for ``W'[o] = s[o] * W[o]`` and
    ``b' = beta + s * (c - mean)``. The arithmetic runs in float64 and is
    rounded once to the result dtype.

    Examples
    --------
    >>> import numpy as np
    >>> bn = BatchNorm(np.array([2.0]), np.array([1.0]), np.array([3.0]), np.array([4.0]), eps=0.0)
    >>> kernel, bias = fuse_bn(np.ones((1, 1, 1, 1)), bn)
    >>> float(kernel[0, 0, 0, 0]), float(bias[0])
    (1.0, -2.0)
    """
    func = "fuse_bn"
    weights = as_float_array(kernel, func=func, name="kernel", ndim=4)
    out_channels = weights.shape[0]
    bn = _check_batch_norm(bn, func=func, name="bn", channels=out_channels, what="kernel's C_out")
    arrays = [weights, bn.gamma]
    if conv_bias is not None:
        own_bias = bias_vector(
            conv_bias, length=out_channels, func=func, name="conv_bias", what="the kernel's C_out"
        )
        arrays.append(own_bias)
    result_dtype = np.result_type(*arrays)
    work = _working_dtype(result_dtype)
    scale = bn.gamma.astype(work) / np.sqrt(bn.var.astype(work) + bn.eps)
    offset = -bn.mean.astype(work)
    if conv_bias is not None:
        offset = offset + own_bias.astype(work)
    fused_kernel = weights.astype(work, copy=False) * scale[:, None, None, None]
    fused_bias = bn.beta.astype(work) + offset * scale
    return ConvBias(
        fused_kernel.astype(result_dtype, copy=False), fused_bias.astype(result_dtype, copy=False)
    )


def _check_branch(branch: Any, index: int, *, func: str) -> tuple[FloatArray, FloatArray]:
    try:
        kernel, bias = branch
    except (TypeError, ValueError):
        raise ReparamError(
            f"{func}: branch {index} must be a pair (kernel, bias); got {type(branch).__name__}"
        ) from None
    kernel = as_float_array(kernel, func=func, name=f"branch {index} kernel", ndim=4)
    bias = bias_vector(
        bias, length=kernel.shape[0], func=func, name=f"branch {index} bias", what="its C_out"
    )
    return kernel, bias


def sum_branches(*branches: tuple[npt.ArrayLike, npt.ArrayLike]) -> ConvBias:
    """Sum parallel convolutions that share input, stride, padding and groups.

    Convolution is linear in its kernel, so
    ``conv(x, K1) + b1 + conv(x, K2) + b2 = conv(x, K1 + K2) + (b1 + b2)``.

    Parameters
    ----------
    *branches : (kernel, bias) pairs
        Each kernel of shape ``(C_out, C_in // groups, kH, kW)`` (all the
        same shape) and each bias of shape ``(C_out,)``.

    Returns
    -------
    ConvBias
        The summed ``(kernel, bias)`` in ``np.result_type`` of the inputs.

    Raises
    ------
    ReparamError
        If no branch is given, a branch is not a pair of a 4-D kernel and a
        matching bias, or the kernel shapes differ. A smaller kernel is never
        broadcast: pad it first with :func:`pad_kernel`.

    Examples
    --------
    >>> import numpy as np
    >>> kernel, bias = sum_branches((np.ones((1, 1, 1, 1)), np.ones(1)),
    ...                             (np.ones((1, 1, 1, 1)), np.zeros(1)))
    >>> float(kernel.sum()), float(bias[0])
    (2.0, 1.0)
    """
    func = "sum_branches"
    if not branches:
        raise ReparamError(f"{func}: no branches given; expected at least one (kernel, bias) pair")
    checked = [_check_branch(branch, index, func=func) for index, branch in enumerate(branches)]
    first_shape = checked[0][0].shape
    for index, (kernel, _) in enumerate(checked[1:], start=1):
        if kernel.shape == first_shape:
            continue
        hint = ""
        if kernel.shape[:2] == first_shape[:2]:
            target = tuple(np.maximum(kernel.shape[2:], first_shape[2:]).tolist())
            hint = f" (hint: pad the smaller kernel with pad_kernel(kernel, {target}))"
        raise ReparamError(
            f"{func}: branch kernels must have one shape; got branch 0 {first_shape} and branch "
            f"{index} {kernel.shape}{hint}"
        )
    result_dtype = np.result_type(*(a for pair in checked for a in pair))
    work = _working_dtype(result_dtype)
    kernel_sum = np.zeros(first_shape, dtype=work)
    bias_sum = np.zeros(first_shape[0], dtype=work)
    for kernel, bias in checked:
        kernel_sum += kernel
        bias_sum += bias
    return ConvBias(
        kernel_sum.astype(result_dtype, copy=False), bias_sum.astype(result_dtype, copy=False)
    )


def _unpack_conv_bn(pair: Any, *, func: str, name: str) -> tuple[FloatArray, BatchNorm]:
    try:
        kernel, bn = pair
    except (TypeError, ValueError):
        raise ReparamError(
            f"{func}: {name} must be a pair (kernel, BatchNorm); got {type(pair).__name__}"
        ) from None
    return as_float_array(kernel, func=func, name=f"{name} kernel", ndim=4), bn


def fuse_block(
    dense: tuple[npt.ArrayLike, BatchNorm],
    pointwise: tuple[npt.ArrayLike, BatchNorm] | None = None,
    identity: BatchNorm | None = None,
    *,
    groups: int = 1,
) -> ConvBias:
    """Fuse a RepVGG block's branches into one convolution with bias.

    The train-form block computes
    ``bn_d(conv(x, W_d)) + bn_p(conv(x, W_p)) + bn_i(x)`` with the dense
    branch at padding ``p = K // 2``, the pointwise branch at padding
    ``p - (K - k) // 2`` and both at one stride and ``groups``. This returns
    the single ``K x K`` kernel and bias that compute the same with padding
    ``p``. It is the RepVGG special case of the branch algebra, one line over
    it: ``fold(repvgg_tree(dense, pointwise, identity, groups=groups))``
    (:func:`reparam.core.algebra.fold`), which takes the four steps of the
    derivation: fold each BN (:func:`fuse_bn`), centre the small kernel
    (:func:`pad_kernel`), write the identity as a kernel
    (:func:`identity_kernel`), and sum (:func:`sum_branches`).

    Parameters
    ----------
    dense : (kernel, BatchNorm)
        Kernel of shape ``(C_out, C_in // groups, K, K)``, ``K`` odd (3 in
        RepVGG), and its BatchNorm over ``C_out``.
    pointwise : (kernel, BatchNorm), optional
        Kernel of shape ``(C_out, C_in // groups, k, k)`` with odd ``k <= K``
        (1 in RepVGG) and its BatchNorm.
    identity : BatchNorm, optional
        The BatchNorm applied to the input itself; only valid when
        ``C_in == C_out`` (and the block has stride 1).
    groups : int, default 1
        Groups shared by the convolutions.

    Returns
    -------
    ConvBias
        ``kernel`` of shape ``(C_out, C_in // groups, K, K)`` and ``bias`` of
        shape ``(C_out,)`` in ``np.result_type`` of every input array (a
        float16 block stays float16); all arithmetic runs in float64 and is
        rounded once.

    Raises
    ------
    ReparamError
        If the dense kernel is not square and odd, a BatchNorm does not match
        ``C_out``, the pointwise kernel is larger than the dense one or
        disagrees on ``(C_out, C_in // groups)``, ``groups`` does not divide
        ``C_out``, or an identity is given with ``C_in != C_out``.

    Examples
    --------
    >>> import numpy as np
    >>> unit = BatchNorm(np.ones(2), np.zeros(2), np.zeros(2), np.ones(2), eps=0.0)
    >>> kernel, bias = fuse_block((np.zeros((2, 2, 3, 3)), unit), identity=unit)
    >>> kernel[:, :, 1, 1]
    array([[1., 0.],
           [0., 1.]])
    """
    func = "fuse_block"
    groups = positive_int(groups, func=func, name="groups")
    dense_kernel, dense_bn = _unpack_conv_bn(dense, func=func, name="dense")
    out_channels, per_group, size_h, size_w = dense_kernel.shape
    if size_h != size_w or size_h % 2 == 0:
        raise ReparamError(
            f"{func}: dense kernel must be square with an odd size; got spatial size "
            f"{size_h}x{size_w}, expected KxK with K odd (e.g. 3x3)"
        )
    size = size_h
    groups_divide(groups, out_channels, func=func, what="C_out")
    in_channels = per_group * groups
    _check_batch_norm(
        dense_bn,
        func=func,
        name="dense BatchNorm",
        channels=out_channels,
        what="dense kernel's C_out",
    )
    arrays: list[Any] = [dense_kernel, dense_bn.gamma]

    pointwise_kernel: FloatArray | None = None
    if pointwise is not None:
        pointwise_kernel, pointwise_bn = _unpack_conv_bn(pointwise, func=func, name="pointwise")
        if pointwise_kernel.shape[:2] != dense_kernel.shape[:2]:
            raise ReparamError(
                f"{func}: pointwise kernel must share (C_out, C_in // groups) with the dense "
                f"kernel; got {pointwise_kernel.shape[:2]}, expected {dense_kernel.shape[:2]}"
            )
        small_h, small_w = pointwise_kernel.shape[2:]
        if small_h > size or small_w > size:
            raise ReparamError(
                f"{func}: pointwise kernel is larger than the dense kernel; got "
                f"{small_h}x{small_w}, expected at most {size}x{size}"
            )
        if small_h % 2 == 0 or small_w % 2 == 0:
            raise ReparamError(
                f"{func}: pointwise kernel must have odd sizes to centre in {size}x{size}; got "
                f"{small_h}x{small_w}"
            )
        _check_batch_norm(
            pointwise_bn,
            func=func,
            name="pointwise BatchNorm",
            channels=out_channels,
            what="pointwise kernel's C_out",
        )
        arrays += [pointwise_kernel, pointwise_bn.gamma]

    if identity is not None:
        if in_channels != out_channels:
            raise ReparamError(
                f"{func}: an identity branch needs C_in == C_out; got C_in={in_channels} "
                f"(C_in // groups={per_group} x groups={groups}) and C_out={out_channels} "
                "(hint: check groups=, or drop the identity)"
            )
        _check_batch_norm(
            identity,
            func=func,
            name="identity BatchNorm",
            channels=out_channels,
            what="block's channels",
        )
        arrays.append(identity.gamma)

    small = None
    if pointwise is not None and pointwise_kernel is not None:
        small = (pointwise_kernel, pointwise_bn)
    tree = repvgg_tree((dense_kernel, dense_bn), small, identity, groups=groups)
    return fold(tree).as_conv_bias()


def repvgg_tree(
    dense: tuple[npt.ArrayLike, BatchNorm],
    pointwise: tuple[npt.ArrayLike, BatchNorm] | None = None,
    identity: BatchNorm | None = None,
    *,
    stride: int = 1,
    groups: int = 1,
    padding: int | None = None,
    names: tuple[str, str, str] = ("dense", "pointwise", "identity"),
    name: str = "RepVGG block",
) -> Parallel:
    """Build a RepVGG block's train form as a tree of the algebra, every branch centred.

    ``bn_d(conv(x, W_d)) + bn_p(conv(x, W_p)) + bn_i(x)``: the dense kernel
    padded by ``padding`` (``K // 2`` by default), the small kernel by
    ``padding - (K - k) // 2`` so that it sits in the dense kernel's centre.
    The one description of the block's structure: :func:`fuse_block`,
    :class:`reparam.TrainBlock` and the ``RepVGGBlock`` family all use it.

    Parameters
    ----------
    dense, pointwise, identity
        As in :func:`fuse_block`.
    stride : int, default 1
    groups : int, default 1
    padding : int, optional
        The dense branch's padding (the published block's ``padding``).
    names : (str, str, str)
        The branches' names in messages (a checkpoint's ``rbr_dense`` ...).
    name : str
        The block's.

    Returns
    -------
    Parallel
        The tree :func:`fuse_block` folds, and that :class:`reparam.TrainBlock`
        evaluates and folds.
    """
    size_h, size_w = np.shape(dense[0])[2:]
    outer = (
        (centred_padding(size_h), centred_padding(size_w)) if padding is None else (padding,) * 2
    )

    def conv_bn(pair: tuple[npt.ArrayLike, BatchNorm], name: str) -> Sequential:
        kernel = np.asarray(pair[0])
        pads = tuple(
            pad - (big - small) // 2
            for pad, big, small in zip(outer, (size_h, size_w), kernel.shape[2:], strict=True)
        )
        conv = Conv(kernel, stride=stride, padding=pads, groups=groups, name=f"{name}.conv")
        return Sequential(conv, Norm(pair[1], name=f"{name}.bn"), name=name)

    branches: list[Node] = [conv_bn(dense, names[0])]
    if pointwise is not None:
        branches.append(conv_bn(pointwise, names[1]))
    if identity is not None:
        branches.append(Norm(identity, name=names[2]))
    return Parallel(*branches, name=name)
