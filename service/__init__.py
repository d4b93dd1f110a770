"""eddy's service: everything with a clock or a socket, in layers that import one way only.

From the bottom up (a module may import its own subpackage and the layers below it, never above;
``tests/test_layers.py`` keeps this):

- ``service.errors``, ``service.metrics``: the error types and the Prometheus metrics, used by all;
- ``service.core``: the daemon's pure core (events, batches, learner state, forget rules, snapshot
  format); no sockets, no threads;
- ``service.kafka``: Kafka clients, dead letters, re-reading events, the scale-out deltas topic;
- ``service.models``: the backbone, the exporter and its gates, the model registry, the served model;
- ``service.serving``: what clients call: gRPC (eddy.v1, OIP v2), OIP v2 over HTTP/REST, operations
  HTTP, admin actions;
- ``service.roles``: the learn roles (single-process learn loop, scale-out replica, merger);
- ``service.tools``: developer tools (local broker, demo, ``top``, ``produce``, ``predict``, state
  inspection); nothing in the daemon imports them;
- ``service.app``: configuration read once, wiring of parts from settings, the daemon, the CLI.

``learner/`` and ``memory/`` sit below all of it and import nothing of ``service``.
"""
