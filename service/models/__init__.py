"""Models: the backbone, the exporter and its gates, the registry, the served model.

Models: the frozen backbone (``backbone``), exporting a head through the parity and quality
gates (``exporter``), the on-disk model registry (``registry``) and the immutable served model
with the slot that swaps it by reference (``served``).

Models never touch Kafka. May import ``service.core`` and below.
"""
