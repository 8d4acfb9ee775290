"""Fixtures shared by the test files."""

from __future__ import annotations

import pytest


@pytest.fixture
def isolated_data(tmp_path, monkeypatch):
    """Point every prunelab data location into tmp so nothing is written elsewhere."""
    monkeypatch.setenv("PRUNELAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("PRUNELAB_DATA", raising=False)
    return tmp_path
