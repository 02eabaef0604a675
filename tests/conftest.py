"""Suite-wide collection rule: the long soak (``@pytest.mark.soak``) runs only when a ``-m``
expression names it (``pytest -m soak``), so ``-m slow`` or a plain run never starts minutes of load."""

from __future__ import annotations

import pytest


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if "soak" in (config.getoption("markexpr") or ""):
        return
    soak = [i for i in items if i.get_closest_marker("soak") is not None]
    if soak:
        config.hook.pytest_deselected(items=soak)
        items[:] = [i for i in items if i.get_closest_marker("soak") is None]
