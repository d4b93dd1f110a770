"""The daemon's side of the admin RPCs: rollback, export now, forget.

Anything that touches learner state runs on the learner thread (``AdminLearner.submit``); the RPC
awaits the result without blocking the event loop. Where no learner runs in this process but a
``ForgetPublisher`` is given (a serving replica in scale-out mode), ``forget`` publishes the request
to the control topic for the learner replicas instead.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, Protocol

from service.core.forget import MAX_IDS_PER_REQUEST, ForgetRequest
from service.errors import BrokerError, ModelError
from service.models.registry import ModelRegistry
from service.models.served import Backbone, ModelSlot, load_served_model


class AdminLearner(Protocol):
    """What the admin actions need of the learn loop (``service.roles.learn_loop.LearnLoop`` fits)."""

    def submit(self, fn: Callable[[], Any]) -> Future[Any]:
        """Run ``fn`` on the learner thread between batches; its future."""

    def pause_exports(self) -> None:
        """Stop automatic exports once any export in flight has landed."""

    def export_now(self) -> int | None:
        """Export through the gates now; the applied version, if any."""

    def forget(self, request: Any) -> dict[str, Any]:
        """Apply a forget request now."""

    def snapshot(self, why: str) -> bool:
        """Write the state durably now; whether it is durable."""


audit = logging.getLogger("eddy.audit")


class ForgetPublisher(Protocol):
    """Hands a forget request to the learners (``service.kafka.control.ControlPublisher`` fits)."""

    def publish(self, request: ForgetRequest) -> str:
        """Publish durably; return where it went. Raises ``BrokerError`` if it was not accepted."""


class DaemonAdmin:
    """Implements ``service.serving.grpc``'s AdminHandler protocol for a running daemon.

    ``learner`` returns the learn loop of this process, or None where it does not learn (role
    ``serve``, ``merge``, or a scale-out replica): admin calls that need a learner then fail with
    a ``ModelError`` saying where to send them, except ``forget`` with a ``forget_publisher``.
    """

    def __init__(self, registry: ModelRegistry, slot: ModelSlot, backbone: Backbone | None, *,
                 learner: Callable[[], AdminLearner | None],
                 forget_publisher: ForgetPublisher | None = None) -> None:
        self.registry = registry
        self.slot = slot
        self.backbone = backbone
        self._learner = learner
        self.forget_publisher = forget_publisher

    async def rollback(self, version: int | None) -> int:
        """Republish an earlier version as the newest and serve it; return the new version.

        Automatic exports pause so the rolled-back model keeps serving while the learner goes on
        learning; an ``Export`` call (``eddy.v1.Admin/Export``) resumes them.
        """
        loop = self._learner()
        if loop is not None:
            await asyncio.wrap_future(loop.submit(loop.pause_exports))
        new_version = await asyncio.to_thread(self.registry.rollback, version)
        model = await asyncio.to_thread(load_served_model, self.registry.path(new_version), self.backbone,
                                        version=new_version)
        self.slot.swap(model)
        return int(new_version)

    async def export(self) -> int:
        """Export the learner's head now; return the served version afterwards."""
        loop = self._loop()
        version = await asyncio.wrap_future(loop.submit(loop.export_now))
        current = self.slot.get()
        return int(version if version is not None else (current.version if current else 0))

    async def forget(self, ids: list[str], label: str | None) -> dict[str, Any]:
        """Forget events by id and/or a whole label; return once a model without them serves.

        With no learner here but a ``forget_publisher`` (scale-out), the request is published to the
        control topic and the reply only acknowledges it: ``{"forgotten": 0, ..., "published":
        "topic:p@offset"}`` (the learner replicas apply it within moments; the merged model follows).
        Raises ``ValueError`` beyond ``MAX_IDS_PER_REQUEST`` ids (the control topic's cap), and
        ``ModelError`` when the forget is applied but could not be made durable, or no model
        without the forgotten events could be served (the learner keeps retrying that export).
        """
        if len(ids) > MAX_IDS_PER_REQUEST:
            raise ValueError(f"at most {MAX_IDS_PER_REQUEST} ids per forget request, got {len(ids)}")
        request = ForgetRequest(tuple(ids), label)
        if self._learner() is None and self.forget_publisher is not None:
            return await self._publish_forget(self.forget_publisher, request)
        loop = self._loop()

        def forget_durably() -> dict[str, Any]:
            # Unlike the control topic, nothing in Kafka replays this request: snapshot before replying.
            outcome = dict(loop.forget(request))
            if not loop.snapshot("forget"):
                raise ModelError("forget applied in memory, but its snapshot could not be written (see /readyz); "
                                 "it is retried, and lost if the process dies first")
            return outcome

        result = await asyncio.wrap_future(loop.submit(forget_durably))
        if result.get("forgotten") or result.get("memory_removed"):
            version = await asyncio.wrap_future(loop.submit(loop.export_now))
            if version is None:
                raise ModelError("forget applied and durable, but no model without the forgotten events could be "
                                 "served yet (see the log and eddy_swaps_total); the learner keeps retrying")
        return dict(result)

    async def _publish_forget(self, publisher: ForgetPublisher, request: ForgetRequest) -> dict[str, Any]:
        try:
            where = await asyncio.to_thread(publisher.publish, request)
        except BrokerError as exc:
            raise ModelError(f"forget request not accepted: {exc}") from None
        audit.info("forget request published to %s by Admin/Forget: ids=%d label=%r", where, len(request.ids),
                   request.label)
        return {"forgotten": 0, "unknown": 0, "memory_removed": 0, "partial": False, "published": where}

    def _loop(self) -> AdminLearner:
        loop = self._learner()
        if loop is None:
            raise ModelError("this process does not learn (role 'serve'): send admin calls to a learner")
        return loop
