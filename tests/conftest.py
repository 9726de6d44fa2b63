"""Shared pytest fixtures: offscreen Qt, the optional ../shared/data folder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
# extracted .zip bundles go to a cache of the test run, not the user's ~/.cache
if "KDVIEWER_CACHE" not in os.environ:
    import atexit
    import shutil
    import tempfile

    os.environ["KDVIEWER_CACHE"] = tempfile.mkdtemp(prefix="kdviewer-bundle-cache-")
    atexit.register(shutil.rmtree, os.environ["KDVIEWER_CACHE"], True)

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data, or skip: a user's fresh clone has no ../shared."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data folder {SHARED_DATA} is absent (only present beside the CI checkout)")
    return SHARED_DATA
