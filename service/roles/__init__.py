"""The learn roles: the single-process learn loop, the scale-out replica, the merger.

The learn roles: the single-process learn loop (``learn_loop``, with its collaborators
``exports``, ``snapshots``, ``progress`` and ``embed_ahead``), the scale-out replica (``replica``,
with its ``partitions`` and the forget requests it follows, ``control``) and the merger (``merger``,
with its view of forget requests, ``forget_view``).

Each role receives typed parts built by ``service.app.wiring`` and runs until told to stop. May
import ``service.models``, ``service.kafka``, ``service.core`` and below; never ``service.serving``,
``service.app`` or ``service.tools``.
"""
