"""Reading a sentence-transformers model folder: what the encoder is, without loading it.

A folder is what ``SentenceTransformer.save`` writes: ``modules.json`` listing a ``Transformer``
(the folder root: ``config.json``, weights, tokenizer), a ``Pooling`` module (its
``config.json`` names the modes) and optionally ``Normalize``. eddy reproduces exactly that chain;
a folder with any other module (``Dense``, ``LayerNorm``, ...) is refused with the module's name,
since silently skipping it would give different embeddings from sentence-transformers.

A bare Hugging Face folder (``config.json`` and weights, no ``modules.json``) is read the way
sentence-transformers reads one: mean pooling.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# sentence-transformers' concatenation order when several modes are on (its legacy key order).
POOLING_MODES = ("cls", "max", "mean", "mean_sqrt_len_tokens")
_LEGACY_KEYS = {"pooling_mode_cls_token": "cls", "pooling_mode_max_tokens": "max",
                "pooling_mode_mean_tokens": "mean", "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
                "pooling_mode_weightedmean_tokens": "weightedmean", "pooling_mode_lasttoken": "lasttoken"}
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
_ALLOWED = {"Transformer", "Pooling", "Normalize"}


@dataclass(frozen=True)
class EncoderFolder:
    """A readable sentence-transformers folder.

    ``pooling`` lists the modes in sentence-transformers' concatenation order; ``dim`` is the
    pooled width (hidden size times the number of modes); ``weights`` is the file hashed for the
    identity; ``pad_id`` is the tokenizer's padding id (0 for BERT, 1 for MPNet).
    """

    directory: Path
    pooling: tuple[str, ...]
    normalize: bool
    hidden_size: int
    max_seq_length: int | None
    weights: Path
    pad_id: int

    @property
    def dim(self) -> int:
        """Width of one embedding."""
        return self.hidden_size * len(self.pooling)


def read_folder(directory: Path) -> EncoderFolder:
    """Read ``directory``; ``ValueError`` naming the file or module when it is not usable."""
    directory = Path(directory)
    config = _json(directory / "config.json")
    weights = next((directory / f for f in _WEIGHT_FILES if (directory / f).is_file()), None)
    if weights is None:
        raise ValueError(f"{directory}: no weights (expected one of {', '.join(_WEIGHT_FILES)})")
    if not (directory / "tokenizer.json").is_file():
        raise ValueError(f"{directory}: no tokenizer.json (a fast tokenizer file is required)")
    pooling: tuple[str, ...] = ("mean",)
    normalize = False
    if (directory / "modules.json").is_file():
        pooling, normalize = _modules(directory)
    st_config = directory / "sentence_bert_config.json"
    max_seq = _json(st_config).get("max_seq_length") if st_config.is_file() else None
    return EncoderFolder(directory=directory, pooling=pooling, normalize=normalize,
                         hidden_size=int(config["hidden_size"]), max_seq_length=max_seq, weights=weights,
                         pad_id=_pad_id(directory))


def weights_digest(folder: EncoderFolder) -> str:
    """First 12 hex digits of sha256 over the weights file (about 0.2 s per 100 MB)."""
    digest = hashlib.sha256()
    with open(folder.weights, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:12]


def _modules(directory: Path) -> tuple[tuple[str, ...], bool]:
    modules = _json(directory / "modules.json")
    if not isinstance(modules, list):
        raise ValueError(f"{directory / 'modules.json'}: expected a list of modules")
    kinds = [str(m.get("type", "")).rsplit(".", 1)[-1] for m in modules]
    unknown = [k for k in kinds if k not in _ALLOWED]
    if unknown or not kinds or kinds[0] != "Transformer":
        raise ValueError(f"{directory}: modules {kinds} are not supported; eddy runs Transformer -> Pooling "
                         f"[-> Normalize] (unsupported: {unknown or kinds[:1]})")
    pooling: tuple[str, ...] = ("mean",)
    for module, kind in zip(modules, kinds, strict=True):
        if kind == "Pooling":
            pooling = _pooling_modes(_json(directory / module.get("path", "") / "config.json"))
    return pooling, "Normalize" in kinds


def _pooling_modes(config: dict[str, object]) -> tuple[str, ...]:
    """The modes of a Pooling ``config.json``, new (``pooling_mode``) or legacy (boolean keys)."""
    raw = config.get("pooling_mode")
    if raw is None:
        modes = tuple(mode for key, mode in _LEGACY_KEYS.items() if config.get(key)) or ("mean",)
    else:
        modes = (raw,) if isinstance(raw, str) else tuple(str(m) for m in raw)  # type: ignore[attr-defined]
    bad = [m for m in modes if m not in POOLING_MODES]
    if bad:
        raise ValueError(f"pooling mode(s) {bad} are not supported; eddy supports {list(POOLING_MODES)}")
    if config.get("include_prompt") is False:
        raise ValueError("pooling with include_prompt=false is not supported")
    return modes


def _pad_id(directory: Path) -> int:
    tokenizer = _json(directory / "tokenizer.json")
    padding = tokenizer.get("padding") or {}
    if "pad_id" in padding:
        return int(padding["pad_id"])
    vocab = (tokenizer.get("model") or {}).get("vocab")
    if isinstance(vocab, dict):
        for token in ("[PAD]", "<pad>"):
            if token in vocab:
                return int(vocab[token])
    return 0


def _json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"{path}: not found") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
