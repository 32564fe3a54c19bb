"""The one table of numerical tolerances, and the assertion that applies it.

Tolerances are relative to the magnitude of the result: an error of
``TOLERANCE[dtype] * magnitude`` is allowed, where ``magnitude`` is the largest
absolute value of the expected result, or, for sums with cancellation, the
largest absolute value of the terms that were summed (``scale=``), which is
what floating-point error is proportional to. They are never loosened to make
a test pass.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

TOLERANCE: dict[np.dtype[Any], float] = {
    np.dtype(np.float64): 1e-10,
    np.dtype(np.float32): 2e-5,
    # Half precision (PyTorch modules run in float16): each layer rounds its weights and its
    # output to 11 significant bits (unit roundoff u = 2**-11 ~ 4.9e-4) and passes on the error
    # of the layers before; 4u = 2**-9 per the magnitude of the layer's terms. Measured on a
    # small network (tests/test_graph_torch.py): at most 0.6u, train form and folded alike.
    np.dtype(np.float16): 2e-3,
}

#: bfloat16 (NumPy has no such dtype to key the table by): 8 significant bits, u = 2**-8,
#: the same 4u = 2**-6 as float16's entry.
BFLOAT16_TOLERANCE = 1.6e-2

DTYPES = (np.float32, np.float64)


def assert_close(
    actual: npt.ArrayLike,
    expected: npt.ArrayLike,
    *,
    dtype: npt.DTypeLike,
    scale: float | None = None,
    what: str = "",
) -> None:
    """Assert ``|actual - expected| <= TOLERANCE[dtype] * magnitude`` elementwise."""
    actual = np.asarray(actual)
    expected = np.asarray(expected)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    magnitude = float(np.max(np.abs(expected), initial=0.0)) if scale is None else float(scale)
    tolerance = TOLERANCE[np.dtype(dtype)]
    np.testing.assert_allclose(
        actual.astype(np.float64),
        expected.astype(np.float64),
        rtol=0,
        atol=tolerance * magnitude,
        err_msg=f"{what} (tolerance {tolerance:g} x magnitude {magnitude:.3g})",
    )
