"""Fixtures of the analysis tests: the shared trained run, loaded once, and its validation images."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def micro(trained_run):
    """The trained vitkit_micro_p4_16 (about 90-95% on digits), in eval mode."""
    import vitkit

    return vitkit.load(trained_run)


@pytest.fixture(scope="session")
def val_pixels(micro, digits):
    """(images in [0, 1] at 16 px, targets) of 128 validation digits."""
    from vitkit.analyze.common import pixel_transform

    data = digits.val.subset(list(range(128)))
    return pixel_transform(micro)(data.images, data.targets)
