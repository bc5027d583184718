"""Shared test setup: Lightning's banners and the warnings of tiny CPU runs stay out of the
test output (``gradaccum_lightning.testing.quiet_lightning`` around every test)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from gradaccum_lightning.testing import quiet_lightning


@pytest.fixture(autouse=True)
def _quiet_lightning() -> Iterator[None]:
    with quiet_lightning():
        yield
