"""The head registry: ``config.toml``'s ``head.kind`` -> a head class, and state merging.

Kinds: ``ncm`` (cosine nearest class mean), ``slda`` (streaming LDA, shared shrunk covariance),
``ridge`` (analytic ridge on random ReLU features, lambda by GCV). All are exact: learning is
order- and chunking-invariant and ``forget_many`` undoes ``learn_many``.
"""

from __future__ import annotations

from typing import Any

from learner.heads.base import Head, Readout, StateDict
from learner.heads.ncm import NearestClassMeanHead
from learner.heads.ridge import RidgeHead
from learner.heads.slda import StreamingLDAHead
from learner.heads.stats import ExactHead

HEADS: dict[str, type[ExactHead]] = {
    "ncm": NearestClassMeanHead,
    "slda": StreamingLDAHead,
    "ridge": RidgeHead,
}

__all__ = ["HEADS", "ExactHead", "Head", "NearestClassMeanHead", "Readout", "RidgeHead", "StateDict",
           "StreamingLDAHead", "make_head", "merge_states"]


def make_head(kind: str, **params: Any) -> ExactHead:
    """A new head of ``kind`` built with ``params``.

    Raises ``ValueError`` naming the known kinds for an unknown one, and for bad parameters
    (an unexpected name, or a value the head rejects).
    """
    cls = HEADS.get(kind)
    if cls is None:
        raise ValueError(f"unknown head kind {kind!r}; known kinds: {', '.join(sorted(HEADS))}")
    try:
        return cls(**params)
    except TypeError as exc:  # unexpected keyword: a configuration error, not a programming one
        raise ValueError(f"bad parameters for head {kind!r}: {exc}") from None


def merge_states(states: list[StateDict]) -> StateDict:
    """Sum the statistics of several same-kind, same-hyperparameter heads, aligned by class name.

    Classes in the result are in first-seen order across ``states`` in order. Values chosen from
    the data (ridge's GCV lambda, a fitted temperature) are dropped: the merged head chooses or
    is given them again. Raises ``ValueError`` for an empty list, mixed kinds or hyperparameters,
    or different feature dimensions.
    """
    if not states:
        raise ValueError("merge_states needs at least one state")
    kind = str(states[0]["kind"])
    hyper = dict(states[0].get("hyperparameters", {}))
    merged = make_head(kind, **hyper)
    for state in states:
        if state.get("kind") != kind or dict(state.get("hyperparameters", {})) != hyper:
            raise ValueError(f"cannot merge {state.get('kind')!r} {state.get('hyperparameters')} with "
                             f"{kind!r} {hyper}: kind and hyperparameters must match")
        part = make_head(kind, **hyper)
        part.load_state_dict(state)
        merged.absorb(part)
    return merged.state_dict()
