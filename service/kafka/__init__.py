"""Kafka plumbing: clients, dead letters, re-reading events, the deltas topic.

Kafka plumbing: consumers, producers and topics (``clients``), re-reading learned events for a
forget (``refetch``), the scale-out deltas topic (``deltas``), and publishing to / reading the
whole control topic in scale-out mode (``control``).

Translates kafka-python's errors into ``service.errors`` at this boundary. May import
``service.core`` and below.
"""
