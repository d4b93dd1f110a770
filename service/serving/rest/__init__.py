"""The Open Inference Protocol v2 over HTTP/REST (KServe v2 / Triton HTTP), on ``serving.http_port``.

``codec`` translates JSON (and Triton's binary tensor data extension) to and from the OIP v2
messages, ``errors`` maps status codes to HTTP statuses, ``app`` holds the routes and the server's
lifecycle. Every answer comes from the same OIP core as gRPC (``service.serving.grpc.oip_v2``).
"""
