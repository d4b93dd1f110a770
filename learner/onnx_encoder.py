"""The whole encoder as one ONNX graph: export from torch, parity check, int8 quantisation.

The graph takes ``input_ids`` and ``attention_mask`` (int64 ``[batch, sequence]``) and returns
``sentence_embedding`` (float32 ``[batch, dim]``): transformer, the folder's pooling modes and L2
normalisation all inside, so the cached file is the encoder and the served graph needs nothing else.

Checks before a graph is cached (atomically, so a failed check leaves nothing behind):

* fp32: the graph equals sentence-transformers' ``encode(..., normalize_embeddings=True)`` on
  ``PROBE_TEXTS`` to ``PARITY_TOL`` (max absolute difference);
* int8 (ONNX Runtime dynamic quantisation, per-channel int8 weights): an agreement check
  instead, since int8 cannot be exact: the cosine of every probe embedding to the fp32 graph's
  must be at least ``INT8_MIN_COSINE``. Recipes are tried in order; the first that passes is kept.

Everything here imports torch: long-lived processes run it in a child process.
"""

from __future__ import annotations

import inspect
import os
import tempfile
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from learner.st_folder import EncoderFolder

PARITY_TOL = 1e-5
# The floor for int8: measured min cosines on PROBE_TEXTS are 0.99 (MiniLM, per-channel int8);
# a recipe below this floor has broken the encoder (for MPNet, plain per-channel int8 gives
# cosines near 0: activations overflow the u8 x s8 kernels), not merely rounded it.
INT8_MIN_COSINE = 0.95
PROBE_TEXTS = (
    "I am still waiting on my card?",
    "What can I do if my card still hasn't arrived after 2 weeks?",
    "ok",
    "Why was my top-up reverted, and how long until the money is back in my account? " * 3,
    "Comment puis-je changer mon mot de passe ?",
    "The cat sat on the mat.",
    "A man is playing a guitar on stage while the crowd sings along.",
    "Yesterday something went wrong with my exchange rate, and I am really not happy about it at all.",
)
_MAX_POSITIONS = 512


class ExportError(RuntimeError):
    """An export or quantisation failed its check; the message carries the numbers."""


def pooled_encoder(folder: EncoderFolder, *, attn_implementation: str = "sdpa") -> Any:
    """A torch module ``(input_ids, attention_mask) -> unit-norm pooled embedding``.

    ``sdpa`` falls back to eager attention for architectures without it (MPNet).
    """
    os.environ["HF_HUB_OFFLINE"] = "1"  # the model is local; never reach the network
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    import torch
    from transformers import AutoModel
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        model = AutoModel.from_pretrained(str(folder.directory), attn_implementation=attn_implementation,
                                          local_files_only=True).eval()
    except ValueError:  # "does not support an attention implementation through sdpa"
        model = AutoModel.from_pretrained(str(folder.directory), attn_implementation="eager",
                                          local_files_only=True).eval()
    takes_types = "token_type_ids" in inspect.signature(model.forward).parameters
    modes = folder.pooling

    class PooledEncoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            extra = {"token_type_ids": torch.zeros_like(input_ids)} if takes_types else {}
            hidden = self.model(input_ids=input_ids, attention_mask=attention_mask, **extra).last_hidden_state
            weights = attention_mask.unsqueeze(-1).to(hidden.dtype)
            parts = []
            # Same arithmetic as sentence-transformers' Pooling, mode by mode, in its order.
            for mode in modes:
                if mode == "cls":
                    parts.append(hidden[:, 0])  # right padding: the first token is CLS
                elif mode == "max":
                    parts.append(hidden.masked_fill(weights == 0, float("-inf")).max(dim=1).values)
                else:
                    count = weights.sum(1).clamp(min=1e-9)
                    total = (hidden * weights).sum(1)
                    parts.append(total / (count if mode == "mean" else count.sqrt()))
            pooled = parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)
            return torch.nn.functional.normalize(pooled, p=2, dim=1)

    return PooledEncoder().eval()


def export_fp32(folder: EncoderFolder, path: Path, pad: Callable[[Sequence[str]], tuple[np.ndarray, np.ndarray]]
                ) -> None:
    """Export ``folder``'s encoder to ``path`` after checking it against sentence-transformers."""
    import onnxruntime as ort
    import torch

    module = pooled_encoder(folder, attn_implementation="eager")  # sdpa does not export cleanly
    ids, mask = pad(PROBE_TEXTS[:2])  # two lengths: the exporter sees padding, no axis specialised

    def write(tmp: Path) -> None:
        batch, sequence = torch.export.Dim("batch"), torch.export.Dim("sequence", max=_MAX_POSITIONS)
        dims = {"input_ids": {0: batch, 1: sequence}, "attention_mask": {0: batch, 1: sequence}}
        # The legacy TorchScript exporter bakes transformers' mask shapes in as constants (wrong
        # output for other lengths), so the torch.export-based exporter is used.
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the exporter's axis-renaming chatter
            torch.onnx.export(module, (torch.from_numpy(ids), torch.from_numpy(mask)), str(tmp),
                              input_names=["input_ids", "attention_mask"],
                              output_names=["sentence_embedding"], dynamic_shapes=dims,
                              opset_version=18, dynamo=True, external_data=False, verbose=False)
        got = run_graph(ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"]), pad(PROBE_TEXTS))
        want = reference_embeddings(folder, PROBE_TEXTS, module, pad)
        diff = float(np.abs(got - want).max())
        if not diff <= PARITY_TOL:
            raise ExportError(f"ONNX export of {folder.directory} differs from sentence-transformers by "
                              f"{diff:.3g} (max {PARITY_TOL})")

    _atomic(path, write)


def reference_embeddings(folder: EncoderFolder, texts: Sequence[str], module: Any,
                         pad: Callable[[Sequence[str]], tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """sentence-transformers' normalised embeddings of ``texts`` (torch module if it is not installed)."""
    import torch

    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        with torch.no_grad():
            ids, mask = pad(texts)
            return np.asarray(module(torch.from_numpy(ids), torch.from_numpy(mask)).numpy())
    model = SentenceTransformer(str(folder.directory), device="cpu", local_files_only=True)
    model.max_seq_length = min(model.max_seq_length or _MAX_POSITIONS, 128)  # probes are short; match pad()
    return np.asarray(model.encode(list(texts), normalize_embeddings=True, convert_to_numpy=True))


# (name, quantize_dynamic keyword arguments); tried in order, the first above the floor is kept.
INT8_RECIPES: tuple[tuple[str, dict[str, Any]], ...] = (
    ("per-channel-s8", {"per_channel": True, "weight": "QInt8"}),
    # u8 weights avoid the int16 saturation of u8 x s8 kernels on CPUs without VNNI (ORT docs).
    ("per-channel-u8", {"per_channel": True, "weight": "QUInt8"}),
    # MPNet: each layer's FFN output projection sees activation outliers ~1000x the median, which
    # per-tensor dynamic activation scales destroy; those 12 MatMuls stay fp32.
    ("per-channel-u8-fp32-ffn-out", {"per_channel": True, "weight": "QUInt8", "keep_ffn_out": True}),
)


def quantize_int8(fp32_path: Path, path: Path, pad: Callable[[Sequence[str]], tuple[np.ndarray, np.ndarray]]
                  ) -> tuple[str, float]:
    """Dynamically quantise the cached fp32 graph to ``path``; return ``(recipe, min cosine)``.

    Raises ``ExportError`` with every recipe's min cosine if none reaches ``INT8_MIN_COSINE``.
    """
    import onnxruntime as ort
    from onnxruntime.quantization import QuantType, quantize_dynamic

    probe = pad(PROBE_TEXTS)
    want = run_graph(ort.InferenceSession(str(fp32_path), providers=["CPUExecutionProvider"]), probe)
    tried: list[str] = []
    for name, recipe in INT8_RECIPES:
        result: list[float] = []

        def write(tmp: Path, name: str = name, recipe: dict[str, Any] = recipe, result: list[float] = result
                  ) -> None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                keep = _ffn_out_matmuls(fp32_path) if recipe.get("keep_ffn_out") else []
                quantize_dynamic(str(fp32_path), str(tmp), per_channel=recipe["per_channel"],
                                 weight_type=getattr(QuantType, recipe["weight"]), nodes_to_exclude=keep)
            got = run_graph(ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"]), probe)
            result.append(float(min_cosine(got, want)))
            if result[0] < INT8_MIN_COSINE:
                raise ExportError(f"{name}: min cosine {result[0]:.4f}")

        try:
            _atomic(path, write)
            return name, result[0]
        except ExportError as exc:
            tried.append(str(exc))
    raise ExportError(f"int8 quantisation of {fp32_path.name} disagrees with fp32 (floor {INT8_MIN_COSINE}): "
                      + "; ".join(tried))


def _ffn_out_matmuls(path: Path) -> list[str]:
    """Names of the MatMul nodes whose weight is ``[intermediate, hidden]`` (the FFN output dense)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    shapes = {i.name: tuple(i.dims) for i in model.graph.initializer}
    return [n.name for n in model.graph.node if n.op_type == "MatMul" and len(n.input) > 1
            and len(shapes.get(n.input[1], ())) == 2 and shapes[n.input[1]][0] > shapes[n.input[1]][1]]


def min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Smallest row-wise cosine between two ``(n, d)`` arrays."""
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)).clip(min=1e-12)
    return float(cos.min())


def run_graph(session: Any, batch: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """Run an encoder session on ``(ids, mask)``."""
    (out,) = session.run(None, {"input_ids": batch[0], "attention_mask": batch[1]})
    return np.asarray(out, dtype=np.float32)


def _atomic(path: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` then rename ``tmp`` to ``path``; nothing is left behind if it raises."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
