"""Every head kind keeps the shared head contract in ``learner.checks``."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial

import numpy as np
import pytest

from learner.checks import (
    ALL_CHECKS,
    check_clone_independence,
    check_forget_class,
    check_predict_matches_readout,
)
from learner.heads import NearestClassMeanHead, make_head
from learner.heads.base import Head, StateDict

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


class OffReadout(NearestClassMeanHead):
    """Predicts with a temperature its readout does not have: what the parity gate must catch."""

    def predict_proba_many(self, X: np.ndarray) -> tuple[np.ndarray, list[str]]:
        P, classes = super().predict_proba_many(X)
        return (P**2 / (P**2).sum(1, keepdims=True) if classes else P), classes


class LeakyState(NearestClassMeanHead):
    """Hands out its live statistics instead of copies."""

    def state_dict(self) -> StateDict:
        state = super().state_dict()
        state["sums"] = self._table.sums
        return state

    def load_state_dict(self, state: StateDict) -> None:
        super().load_state_dict(state)
        self._table.sums = state["sums"]


class ForgetsNothing(NearestClassMeanHead):
    def forget_many(self, X: np.ndarray, labels: Sequence[str]) -> None:
        pass


@pytest.mark.parametrize("broken,check", [(OffReadout, check_predict_matches_readout),
                                          (LeakyState, check_clone_independence),
                                          (ForgetsNothing, check_forget_class)])
def test_contract_catches_broken_heads(broken: type[Head],
                                       check: Callable[[Callable[[], Head], int], None]) -> None:
    with pytest.raises(AssertionError):
        check(broken, 8)
