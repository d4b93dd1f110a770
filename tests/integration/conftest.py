"""Integration fixtures: the backbone's ONNX graph is exported once, before any daemon starts.

Every daemon reads the repo's ``.eddy/cache``. On a fresh clone the first daemon would export it
(a minute of torch in a child process) while tests time it; exporting up front keeps the daemons'
timings about the product, not about a one-off cache fill.
"""

from __future__ import annotations

import pytest

from learner.backbone import export_onnx
from tests.integration.daemon import REPO


@pytest.fixture(scope="session", autouse=True)
def backbone_cache() -> None:
    export_onnx("all-MiniLM-L6-v2", REPO / ".eddy" / "cache")
