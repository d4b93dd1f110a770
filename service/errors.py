"""The few error types eddy raises, under one base.

Each message says what was expected and what came. Foreign errors (Kafka, gRPC, onnxruntime)
are translated into these once, at the boundary that meets them.
"""


class EddyError(Exception):
    """Base of every error eddy raises on purpose."""


class ConfigError(EddyError):
    """The configuration is invalid; the message names the key, the value and what was expected."""


class BackboneChanged(ConfigError):
    """The newest snapshot was learned with another backbone; its statistics cannot mix with this one's.

    A configuration problem (the CLI exits 2): run the old backbone, or set
    ``backbone.on_backbone_change = "fresh"`` to set the snapshots aside and learn anew.
    """


class BrokerError(EddyError):
    """The local Kafka runner could not do what was asked (missing Java/Maven, broker not answering)."""


class ModelError(EddyError):
    """A model could not be built, exported, validated or found."""


class BackboneUnavailable(ModelError):
    """The backbone cannot embed right now (it failed to load, or the process is stopping).

    Not the event's fault: learners stop without counting the batch, so a restart learns it.
    """


class CheckpointError(EddyError):
    """No usable snapshot could be read or written."""
