"""The [images] space settings: max_pull_bytes and min_free_bytes."""

from __future__ import annotations

import pytest

from agent import config
from agent.config import ConfigError


def test_defaults() -> None:
    images = config.from_mapping({}).images
    assert images.max_pull_bytes == 0  # derived: max_virtual_size_bytes + 64 MiB
    assert images.min_free_bytes == 1 << 30


@pytest.mark.parametrize(("key", "value"), [("max_pull_bytes", 0), ("max_pull_bytes", 1 << 40),
                                            ("min_free_bytes", 0), ("min_free_bytes", 1 << 62)])
def test_accepted_values(key: str, value: int) -> None:
    assert getattr(config.from_mapping({"images": {key: value}}).images, key) == value


@pytest.mark.parametrize("key", ["max_pull_bytes", "min_free_bytes"])
@pytest.mark.parametrize("value", [-1, 1.5, "1G", True])
def test_refused_values_name_the_key(key: str, value: object) -> None:
    with pytest.raises(ConfigError) as caught:
        config.from_mapping({"images": {key: value}})
    assert str(caught.value) == f"[images] {key}: expected a non-negative integer"
