from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Features(_message.Message):
    __slots__ = ("values",)
    VALUES_FIELD_NUMBER: _ClassVar[int]
    values: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, values: _Optional[_Iterable[float]] = ...) -> None: ...

class PredictRequest(_message.Message):
    __slots__ = ("text", "features", "top_k", "model_version", "keep_in_scope")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    KEEP_IN_SCOPE_FIELD_NUMBER: _ClassVar[int]
    text: str
    features: Features
    top_k: int
    model_version: int
    keep_in_scope: bool
    def __init__(self, text: _Optional[str] = ..., features: _Optional[_Union[Features, _Mapping]] = ..., top_k: _Optional[int] = ..., model_version: _Optional[int] = ..., keep_in_scope: _Optional[bool] = ...) -> None: ...

class Prediction(_message.Message):
    __slots__ = ("label", "probability")
    LABEL_FIELD_NUMBER: _ClassVar[int]
    PROBABILITY_FIELD_NUMBER: _ClassVar[int]
    label: str
    probability: float
    def __init__(self, label: _Optional[str] = ..., probability: _Optional[float] = ...) -> None: ...

class PredictResponse(_message.Message):
    __slots__ = ("predictions", "model_version", "label", "unknown", "score")
    PREDICTIONS_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    UNKNOWN_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    predictions: _containers.RepeatedCompositeFieldContainer[Prediction]
    model_version: int
    label: str
    unknown: bool
    score: float
    def __init__(self, predictions: _Optional[_Iterable[_Union[Prediction, _Mapping]]] = ..., model_version: _Optional[int] = ..., label: _Optional[str] = ..., unknown: _Optional[bool] = ..., score: _Optional[float] = ...) -> None: ...

class PredictBatchRequest(_message.Message):
    __slots__ = ("texts", "features", "top_k", "model_version", "keep_in_scope")
    TEXTS_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    KEEP_IN_SCOPE_FIELD_NUMBER: _ClassVar[int]
    texts: _containers.RepeatedScalarFieldContainer[str]
    features: _containers.RepeatedCompositeFieldContainer[Features]
    top_k: int
    model_version: int
    keep_in_scope: bool
    def __init__(self, texts: _Optional[_Iterable[str]] = ..., features: _Optional[_Iterable[_Union[Features, _Mapping]]] = ..., top_k: _Optional[int] = ..., model_version: _Optional[int] = ..., keep_in_scope: _Optional[bool] = ...) -> None: ...

class PredictBatchResult(_message.Message):
    __slots__ = ("predictions", "label", "unknown", "score")
    PREDICTIONS_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    UNKNOWN_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    predictions: _containers.RepeatedCompositeFieldContainer[Prediction]
    label: str
    unknown: bool
    score: float
    def __init__(self, predictions: _Optional[_Iterable[_Union[Prediction, _Mapping]]] = ..., label: _Optional[str] = ..., unknown: _Optional[bool] = ..., score: _Optional[float] = ...) -> None: ...

class PredictBatchResponse(_message.Message):
    __slots__ = ("results", "model_version")
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[PredictBatchResult]
    model_version: int
    def __init__(self, results: _Optional[_Iterable[_Union[PredictBatchResult, _Mapping]]] = ..., model_version: _Optional[int] = ...) -> None: ...

class ModelInfoRequest(_message.Message):
    __slots__ = ("class_offset", "class_limit")
    CLASS_OFFSET_FIELD_NUMBER: _ClassVar[int]
    CLASS_LIMIT_FIELD_NUMBER: _ClassVar[int]
    class_offset: int
    class_limit: int
    def __init__(self, class_offset: _Optional[int] = ..., class_limit: _Optional[int] = ...) -> None: ...

class ModelInfoResponse(_message.Message):
    __slots__ = ("model_name", "model_version", "classes", "feature_dim", "accepts_text", "head_kind", "backbone_identity", "created_at", "source_offsets", "classes_total", "class_offset", "unknown_threshold", "unknown_label")
    class SourceOffsetsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    CLASSES_FIELD_NUMBER: _ClassVar[int]
    FEATURE_DIM_FIELD_NUMBER: _ClassVar[int]
    ACCEPTS_TEXT_FIELD_NUMBER: _ClassVar[int]
    HEAD_KIND_FIELD_NUMBER: _ClassVar[int]
    BACKBONE_IDENTITY_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    SOURCE_OFFSETS_FIELD_NUMBER: _ClassVar[int]
    CLASSES_TOTAL_FIELD_NUMBER: _ClassVar[int]
    CLASS_OFFSET_FIELD_NUMBER: _ClassVar[int]
    UNKNOWN_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    UNKNOWN_LABEL_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    model_version: int
    classes: _containers.RepeatedScalarFieldContainer[str]
    feature_dim: int
    accepts_text: bool
    head_kind: str
    backbone_identity: str
    created_at: float
    source_offsets: _containers.ScalarMap[str, int]
    classes_total: int
    class_offset: int
    unknown_threshold: float
    unknown_label: str
    def __init__(self, model_name: _Optional[str] = ..., model_version: _Optional[int] = ..., classes: _Optional[_Iterable[str]] = ..., feature_dim: _Optional[int] = ..., accepts_text: _Optional[bool] = ..., head_kind: _Optional[str] = ..., backbone_identity: _Optional[str] = ..., created_at: _Optional[float] = ..., source_offsets: _Optional[_Mapping[str, int]] = ..., classes_total: _Optional[int] = ..., class_offset: _Optional[int] = ..., unknown_threshold: _Optional[float] = ..., unknown_label: _Optional[str] = ...) -> None: ...

class RollbackRequest(_message.Message):
    __slots__ = ("version",)
    VERSION_FIELD_NUMBER: _ClassVar[int]
    version: int
    def __init__(self, version: _Optional[int] = ...) -> None: ...

class RollbackResponse(_message.Message):
    __slots__ = ("model_version",)
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    model_version: int
    def __init__(self, model_version: _Optional[int] = ...) -> None: ...

class ExportRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ExportResponse(_message.Message):
    __slots__ = ("model_version",)
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    model_version: int
    def __init__(self, model_version: _Optional[int] = ...) -> None: ...

class ForgetRequest(_message.Message):
    __slots__ = ("ids", "label")
    IDS_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[str]
    label: str
    def __init__(self, ids: _Optional[_Iterable[str]] = ..., label: _Optional[str] = ...) -> None: ...

class ForgetResponse(_message.Message):
    __slots__ = ("forgotten", "unknown", "memory_removed", "partial")
    FORGOTTEN_FIELD_NUMBER: _ClassVar[int]
    UNKNOWN_FIELD_NUMBER: _ClassVar[int]
    MEMORY_REMOVED_FIELD_NUMBER: _ClassVar[int]
    PARTIAL_FIELD_NUMBER: _ClassVar[int]
    forgotten: int
    unknown: int
    memory_removed: int
    partial: bool
    def __init__(self, forgotten: _Optional[int] = ..., unknown: _Optional[int] = ..., memory_removed: _Optional[int] = ..., partial: _Optional[bool] = ...) -> None: ...
