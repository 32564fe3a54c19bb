"""The one exception type that reparam raises for malformed input."""

from __future__ import annotations

__all__ = ["ReparamError"]


class ReparamError(ValueError):
    """Malformed input to a reparam function.

    Subclasses :class:`ValueError`, so existing ``except ValueError`` handlers
    keep working. Messages follow ``function: problem; got X, expected Y``
    and end with a hint when a fix exists.
    """

    __module__ = "reparam"  # shown in tracebacks as reparam.ReparamError, where users import it
