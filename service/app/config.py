"""eddy's configuration: the only module that reads ``config.toml`` and ``EDDY_*`` variables.

Resolution order (later wins): defaults here, the TOML file, environment variables named
``EDDY_<SECTION>__<KEY>`` (for example ``EDDY_SERVING__GRPC_PORT=50052``). The result is validated
once; inner code receives plain values, never this object.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
    TomlConfigSettingsSource,
)

from service.errors import ConfigError

DEFAULT_CONFIG_FILE = "config.toml"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class KafkaSettings(_Section):
    """Where events come from and where bad ones go."""

    bootstrap_servers: str = "127.0.0.1:9092"
    topic: str = "eddy.events"
    group_id: str = "eddy"
    control_topic: str = "eddy.control"
    deltas_topic: str = "eddy.deltas"
    # Scale-out learning (``--role learn``): keep one state per source partition and publish it,
    # cumulatively, to ``deltas_topic`` (compacted) for ``--role merge``. See docs/scaling.md.
    scale_out: bool = False
    deltas_max_bytes: int = Field(64 * 1_048_576, ge=1_048_576, le=1024 * 1_048_576)
    auto_offset_reset: Literal["earliest", "latest"] = "earliest"
    max_event_bytes: int = Field(1_048_576, gt=0, le=64 * 1_048_576)
    batch_max_events: int = Field(512, gt=0, le=100_000)
    # Bytes one fetch may bring per partition. Kafka's 1 MiB holds ~128 JSON feature events
    # (8 KB each): batches came back a quarter full. 2 MiB learned 1.4x faster (bench/throughput.py,
    # features); 4 and 8 MiB were 3-4x *slower* with kafka-python 3.0.12 (the learner waited on
    # the broker's larger responses), so bigger is not better here.
    max_partition_fetch_bytes: int = Field(2 * 1_048_576, ge=65_536, le=256 * 1_048_576)
    poll_timeout_ms: int = Field(100, ge=0, le=60_000)
    session_timeout_ms: int = Field(10_000, ge=1_000)
    heartbeat_interval_ms: int = Field(1_000, ge=100)
    dedupe_window: int = Field(1_000_000, ge=0)
    reconnect_backoff_max_ms: int = Field(5_000, ge=50)
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = None
    sasl_username: str | None = None
    sasl_password: SecretStr | None = None
    ssl_cafile: Path | None = None
    ssl_certfile: Path | None = None
    ssl_keyfile: Path | None = None


class BackboneSettings(_Section):
    """The frozen encoder that turns text into features.

    ``name`` is a model name (``all-MiniLM-L6-v2``, ``all-mpnet-base-v2``), a sentence-transformers
    folder path, or a list of them (embeddings concatenated, each L2-normalised). ``dim`` is best
    left out: it is then read from the chosen folders. Given and different from theirs, it declares
    a features-only stream of that width (text events are dead-lettered; the daemon says so at
    start). A model that is not installed needs ``dim`` here and fails, with the install command,
    when first loaded.
    ``on_backbone_change``: a snapshot learned with another backbone stops the daemon (exit 2)
    unless this is ``"fresh"``, which sets that snapshot aside and starts learning from nothing.
    """

    name: str | list[str] = "all-MiniLM-L6-v2"
    runtime: Literal["onnx", "torch"] = "onnx"
    precision: Literal["fp32", "int8"] = "fp32"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dim: int = Field(0, ge=0, le=65_536)
    max_tokens: int = Field(128, ge=8, le=512)
    batch_size: int = Field(64, gt=0, le=4096)
    threads: int = Field(0, ge=0, le=256)
    cache_dir: Path = Path(".eddy/cache")
    models_dir: Path = Path(".eddy/cache/models")
    on_backbone_change: Literal["refuse", "fresh"] = "refuse"

    @field_validator("name")
    @classmethod
    def _names(cls, v: Any) -> Any:
        if isinstance(v, list) and not v:
            raise ValueError("an empty list names no encoder")
        return v

    @model_validator(mode="after")
    def _dim_follows_encoders(self) -> BackboneSettings:
        from learner.backbone import backbone_dim

        if self.runtime == "torch" and self.precision != "fp32":
            raise ValueError("precision int8 needs runtime 'onnx'")
        try:
            dim = backbone_dim(self.name, models_dir=self.models_dir)
        except (ValueError, OSError) as exc:  # not installed (yet): the load says how to install it
            if not self.dim:
                raise ValueError(f"{exc} (or set backbone.dim to start without it)") from None
            return self
        if not self.dim:
            object.__setattr__(self, "dim", dim)
        return self


class HeadSettings(_Section):
    """Which head learns, and its hyperparameters."""

    kind: Literal["ridge", "slda", "ncm"] = "ridge"
    expansion_width: int = Field(2048, ge=0, le=65_536)
    seed: int = Field(0, ge=0)
    ridge_lambda: Literal["gcv"] | float = "gcv"
    gcv_every_seconds: float = Field(30.0, ge=0)
    slda_shrinkage: float = Field(1e-4, ge=0, le=1)
    temperature: Literal["auto"] | float = "auto"
    blas_threads: int = Field(1, ge=0, le=256)
    # Events of a new label beyond this many classes are dead-lettered (``too_many_classes``).
    # Every class costs the default ridge head (2,049 float64 columns) 16 KiB of class sums, 16 KiB
    # of solved weights and 8 KiB per float32 copy (readout, ONNX bytes, ONNX session, the snapshot
    # being written; twice while a new model is swapped in): measured ~140 KiB steady and ~230 KiB
    # at the peak over a 0.4 GB base. At 5,000 classes the daemon held 1.1 GB (peak 1.5 GB), wrote
    # 44 MB ONNX files (x ``export.keep``) and 135 MB snapshots (x ``checkpoint.keep``).
    max_classes: int = Field(5_000, ge=1, le=250_000)

    @field_validator("ridge_lambda", "temperature")
    @classmethod
    def _positive(cls, v: Any) -> Any:
        if isinstance(v, float) and not v > 0:
            raise ValueError(f"must be 'auto'/'gcv' or a positive number, got {v}")
        return v


class MemorySettings(_Section):
    """The FAISS replay memory."""

    index: Literal["flat", "ivf", "hnsw"] = "flat"
    max_items: int = Field(20_000, ge=0)
    max_bytes: int | None = Field(None, gt=0)
    recency_weight: float = Field(0.0, ge=0, le=1)
    error_compensation: bool = True  # bench/drift.py: helps under drift, no cost when stationary
    use_gpu: Literal["auto", "never"] = "auto"


class ExportSettings(_Section):
    """When to export a new model and the gates it must pass."""

    every_events: int = Field(1_000, gt=0)
    every_seconds: float = Field(1.0, gt=0)
    keep: int = Field(10, ge=1)
    registry_dir: Path = Path(".eddy/models")
    parity_tolerance: float = Field(1e-4, gt=0)
    max_accuracy_drop: float = Field(0.02, ge=0, le=1)
    holdout_size: int = Field(512, ge=0)


class UnknownSettings(_Section):
    """Out-of-scope rejection: answer the unknown label when no class fits (README: "Unknown inputs")."""

    enabled: bool = True
    label: str = Field("<unknown>", min_length=1, max_length=200)
    # Share of in-scope inputs the user accepts to see answered "unknown"; the threshold is the
    # conformal quantile of held-out in-scope scores (learner/unknown.py).
    reject_rate: float = Field(0.02, gt=0, lt=0.5)


class ReviewSettings(_Section):
    """The review queue: rejected and low-margin predictions published for a person to label."""

    enabled: bool = False
    topic: str | None = None  # default: "<kafka.topic>.review"
    max_per_second: float = Field(5.0, gt=0, le=10_000)
    margin: float = Field(0.1, ge=0, le=1)  # top probability minus the second below this: doubtful
    dedupe_window: int = Field(10_000, ge=0, le=10_000_000)
    queue_size: int = Field(1_000, ge=1, le=1_000_000)


class ServingSettings(_Section):
    """The inference servers: gRPC, and OIP v2 over HTTP/REST."""

    host: str = "127.0.0.1"
    grpc_port: int = Field(50051, ge=0, le=65_535)
    http_port: int = Field(8000, ge=0, le=65_535)  # OIP v2 over HTTP/REST (KServe/Triton convention)
    # The newest versions kept loaded for version-pinned requests (each costs one head, not a backbone).
    versions_loaded: int = Field(3, ge=1, le=100)
    model_name: str = "eddy"
    max_message_bytes: int = Field(4 * 1_048_576, gt=1024)
    max_batch: int = Field(1024, gt=0)
    max_text_chars: int = Field(10_000, gt=0)
    # Characters summed over one request's texts: bounds the tokenizer's work per request.
    max_request_chars: int = Field(1_000_000, gt=0)
    # Labels per input are clamped to min(top_k, classes, max_top_k); a response whose size would
    # pass max_message_bytes is refused (RESOURCE_EXHAUSTED) before it is built.
    max_top_k: int = Field(1_000, ge=1, le=1_000_000)
    # Text work per encoder call, in characters (each text counted up to 512, about what a 128-token
    # encoder reads): a bigger request is embedded in slices of this size, taking turns with the
    # small requests queued meanwhile, so a short request waits for at most one slice.
    embed_slice_chars: int = Field(2048, ge=1)
    # gRPC connections: at most max_connections at once (more are refused), an idle one (no call)
    # is closed after connection_idle_seconds, keepalive pings find dead peers.
    max_connections: int = Field(512, ge=1, le=1_000_000)
    connection_idle_seconds: float = Field(120.0, gt=0)
    keepalive_seconds: float = Field(60.0, gt=0)
    max_concurrent_streams: int = Field(128, ge=1, le=100_000)
    # Concurrent text requests share encoder calls (one at a time, the queue goes in the next).
    coalesce_texts: bool = True
    tls_cert: Path | None = None
    tls_key: Path | None = None
    admin_token: SecretStr | None = None
    predict_token: SecretStr | None = None
    follow_seconds: float = Field(0.2, gt=0)
    unknown: UnknownSettings = UnknownSettings()
    review: ReviewSettings = ReviewSettings()


class MetricsSettings(_Section):
    """The Prometheus endpoint (also serves /healthz and /readyz)."""

    host: str = "127.0.0.1"
    port: int = Field(9100, ge=0, le=65_535)
    log_every_seconds: float = Field(5.0, gt=0)
    # Concurrent HTTP connections (scrapes, probes); more are closed at once so a flood of idle
    # ones cannot take every thread; each is closed after idle_seconds without a request.
    max_connections: int = Field(64, ge=1, le=10_000)
    idle_seconds: float = Field(10.0, gt=0)


class CheckpointSettings(_Section):
    """Snapshots of state and offsets."""

    dir: Path = Path(".eddy/checkpoints")
    every_events: int = Field(5_000, gt=0)
    every_seconds: float = Field(10.0, gt=0)
    keep: int = Field(3, ge=1)


class Settings(BaseSettings):
    """The whole, validated configuration."""

    model_config = SettingsConfigDict(
        env_prefix="EDDY_",
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
        toml_file=None,
    )

    kafka: KafkaSettings = KafkaSettings()
    backbone: BackboneSettings = BackboneSettings()
    head: HeadSettings = HeadSettings()
    memory: MemorySettings = MemorySettings()
    export: ExportSettings = ExportSettings()
    serving: ServingSettings = ServingSettings()
    metrics: MetricsSettings = MetricsSettings()
    checkpoint: CheckpointSettings = CheckpointSettings()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Precedence: explicit arguments, then environment, then the TOML file, then defaults."""
        toml = TomlConfigSettingsSource(settings_cls, toml_file=_toml_path())
        return (init_settings, env_settings, toml)


_TOML_OVERRIDE: list[Path | None] = [None]


def _toml_path() -> Path | None:
    path = _TOML_OVERRIDE[0]
    if path is None:
        env = os.environ.get("EDDY_CONFIG")
        path = Path(env) if env else Path(DEFAULT_CONFIG_FILE)
    return path if path.exists() else None


def load_settings(path: str | Path | None = None, **overrides: Any) -> Settings:
    """Load and validate the configuration once.

    ``path`` is the TOML file (default ``$EDDY_CONFIG`` or ``./config.toml``; a missing default file
    means defaults). ``overrides`` are section dicts that win over everything (used by tests).
    Raises ``ConfigError`` whose message has one line per problem: key, value, expectation.
    """
    if path is not None and not Path(path).exists():
        raise ConfigError(f"config file {path}: not found")
    _TOML_OVERRIDE[0] = Path(path) if path is not None else None
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc)) from None
    except SettingsError as exc:  # an EDDY_* value that is not valid JSON: its name, never its value
        raise ConfigError(str(exc).split(":", 1)[0]) from None
    finally:
        _TOML_OVERRIDE[0] = None


def _public_keys() -> dict[str, frozenset[str]]:
    """Per section, the keys whose values may be echoed in an error (every key but the secrets)."""
    return {name: frozenset(k for k, f in field.annotation.model_fields.items()  # type: ignore[union-attr]
                            if "SecretStr" not in str(f.annotation))
            for name, field in Settings.model_fields.items()}


_SCALARS = (str, int, float, bool, type(None))


def _shown(loc: tuple[Any, ...], value: Any, kind: str) -> str:
    """What an error may say about ``value`` at ``loc``: only scalars of known, non-secret keys.

    A secret can arrive anywhere: as a whole section (``EDDY_SERVING='["<token>"]'``), inside a
    list or dict, or under a misspelt key (``admin_tokn``), so everything else is described by its
    type and size only.
    """
    if kind == "missing":
        return "<missing>"
    public = _public_keys()
    known = len(loc) >= 2 and loc[0] in public and loc[1] in public[loc[0]]
    if known and kind != "extra_forbidden" and isinstance(value, _SCALARS):
        text = repr(value)
        return text if len(text) <= 80 else text[:77] + "..."
    if len(loc) >= 2 and loc[0] in public and loc[1] not in public[loc[0]] and kind != "extra_forbidden":
        return "<secret>"
    if isinstance(value, dict):
        return "{...}"
    size = f" of {len(value)}" if isinstance(value, (list, tuple)) else ""  # not a string's: a token's length
    return f"<{type(value).__name__}{size}, not shown>"


def format_validation_error(exc: ValidationError) -> str:
    """One line per error: ``section.key: got 'value': expectation`` (values only where safe)."""
    lines = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"])
        shown = _shown(tuple(err["loc"]), err.get("input"), err["type"])
        lines.append(f"{key}: got {shown}: {err['msg']}")
    return "\n".join(lines)


def redacted(settings: Settings) -> dict[str, Any]:
    """The effective configuration as plain data, with every secret replaced by ``'**********'``."""
    return settings.model_dump(mode="json")
