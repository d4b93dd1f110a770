"""Kafka plumbing: clients, dead letters, re-reading events, the deltas topic.

Kafka plumbing: consumers, producers and topics (``clients``), re-reading learned events for a
forget (``refetch``), and the scale-out deltas topic (``deltas``).

Translates kafka-python's errors into ``service.errors`` at this boundary. May import
``service.core`` and below.
"""
