"""Fixtures for the memory tests."""

from __future__ import annotations

from collections.abc import Iterator

import faiss
import pytest


@pytest.fixture(autouse=True, scope="package")
def one_faiss_thread() -> Iterator[None]:
    """Run faiss single-threaded: on the shared 2-core CI box OpenMP's spinning threads make the
    HNSW builds several times slower in wall time, and the results do not depend on it."""
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before)
