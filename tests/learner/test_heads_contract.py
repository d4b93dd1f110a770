"""Every head kind keeps the shared head contract in ``learner.checks``."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import pytest

from learner.checks import ALL_CHECKS
from learner.heads import make_head
from learner.heads.base import Head

HEADS: dict[str, Callable[[], Head]] = {
    "ncm": partial(make_head, "ncm"),
    "slda": partial(make_head, "slda"),
    "ridge-M0-gcv": partial(make_head, "ridge", expansion_width=0),
    "ridge-M64-gcv": partial(make_head, "ridge", expansion_width=64, seed=3),
    "ridge-M64-lam": partial(make_head, "ridge", lam=0.5, expansion_width=64),
}


@pytest.mark.parametrize("check", ALL_CHECKS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("name", HEADS)
def test_head_contract(name: str, check: Callable[[Callable[[], Head], int], None]) -> None:
    check(HEADS[name], 8)
