"""The one exception type that reparam raises for malformed input."""

from __future__ import annotations

__all__ = ["ReparamError"]


class ReparamError(ValueError):
    """Malformed input to a reparam function.

    Subclasses :class:`ValueError`, so existing ``except ValueError`` handlers
    keep working. Messages follow ``function: problem; got X, expected Y``
    and end with a hint when a fix exists.

    Parameters
    ----------
    message : str
    location : str, optional
        Where the error happened (a node of a tree, a block of a network, a
        checkpoint key), when a boundary added it to the message. Set once,
        by the boundary that names the place, so that an enclosing caller
        can tell that the error is located already without reading the text.
    problems : sequence of str, optional
        The separate problems the message lists (e.g. every missing or
        mis-shaped key of a state dict), for a caller that reports them
        among its own.

    Examples
    --------
    >>> error = ReparamError("conv2d: broken").located("stage3.7")
    >>> str(error), error.location
    ('stage3.7: conv2d: broken', 'stage3.7')
    """

    __module__ = "reparam"  # shown in tracebacks as reparam.ReparamError, where users import it

    def __init__(
        self, message: str = "", *, location: str | None = None, problems: tuple[str, ...] = ()
    ) -> None:
        super().__init__(message)
        self.location = location
        self.problems = tuple(problems)

    def located(self, where: str) -> ReparamError:
        """Return a new error saying ``where: message``, with ``where`` as its location."""
        return ReparamError(f"{where}: {self}", location=where, problems=self.problems)
