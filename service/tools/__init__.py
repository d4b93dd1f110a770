"""Developer tools that nothing in the daemon imports.

Developer tools: the local Kafka broker launcher (``broker``), the demo and its data
(``demo``, ``demo_data``), ``eddy top``, ``eddy produce``, the ``eddy predict`` client and state
inspection (``state_report``).

Nothing in the daemon imports them; only the CLI does. May import ``service.serving`` (for the
gRPC stubs), ``service.kafka``, ``service.core`` and below.
"""
