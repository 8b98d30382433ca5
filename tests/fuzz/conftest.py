"""Hypothesis profiles for the fuzz tests.

``ci`` (the default, what `make test` runs): a small budget so the whole
fuzz folder stays within a couple of minutes. ``fuzz`` (`make fuzz`): many
examples per property. ``HYPOTHESIS_PROFILE`` picks one.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

_COMMON = {"deadline": None, "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large,
                                                       HealthCheck.filter_too_much]}
settings.register_profile("ci", max_examples=40, **_COMMON)
settings.register_profile("fuzz", max_examples=5000, **_COMMON)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
