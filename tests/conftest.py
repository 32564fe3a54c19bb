"""Shared test configuration: Hypothesis profiles.

``dev`` (the default on a workstation) is quick; ``ci`` (chosen automatically
when the ``CI`` environment variable is set, or with HYPOTHESIS_PROFILE=ci)
extends Hypothesis' built-in ``ci`` profile (derandomized, no deadline) with
enough examples to matter.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci",
    parent=settings.get_profile("ci"),
    max_examples=200,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("dev", max_examples=30, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))
