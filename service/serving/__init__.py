"""What clients call: gRPC, HTTP/REST, operations HTTP, admin actions.

What clients call: gRPC (``grpc``: eddy.v1, Open Inference Protocol v2, health, reflection),
the Open Inference Protocol v2 over HTTP/REST (``rest``, through the same OIP core as gRPC),
the operations HTTP endpoints (``ops_http``: /metrics, /healthz, /readyz) and the admin actions
(``admin``: forget, rollback, export).

Handlers read only the current served model; admin actions reach the learner through a small
protocol. May import ``service.models``, ``service.core`` and below; never the roles or the app.
"""
