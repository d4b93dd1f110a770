"""eddy's replay memory: a FAISS store of embeddings, its sampling policy, and error compensation."""

from memory.compensation import Compensator, ErrorMemory
from memory.index import IndexKind, Metric, VectorIndex, gpu_count
from memory.policy import class_targets, reservoir_decision
from memory.replay import AddResult, IndexBuild, ReplayMemory

__all__ = [
    "AddResult",
    "Compensator",
    "ErrorMemory",
    "IndexBuild",
    "IndexKind",
    "Metric",
    "ReplayMemory",
    "VectorIndex",
    "class_targets",
    "gpu_count",
    "reservoir_decision",
]
