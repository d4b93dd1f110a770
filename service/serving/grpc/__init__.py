"""eddy's gRPC surface: eddy.v1, Open Inference Protocol v2, health and reflection on one port."""
