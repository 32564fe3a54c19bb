"""Makes ``import reparam.fuse_block`` work: the line leaves ``reparam.fuse_block`` the function.

Python's import statement binds ``reparam.fuse_block`` to whatever
``sys.modules["reparam.fuse_block"]`` holds once this file has run, so the
file puts the function there. ``reparam.fuse_block(...)`` and
``from reparam import fuse_block`` are unaffected.
"""

import sys

from .core.fusion import fuse_block

sys.modules[__name__] = fuse_block  # type: ignore[assignment]
