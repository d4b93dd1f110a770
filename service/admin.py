"""The daemon's side of the admin RPCs: rollback, export now, forget.

Anything that touches learner state runs on the learner thread (``LearnLoop.submit``); the RPC
awaits the result without blocking the event loop.
"""

from __future__ import annotations

import asyncio
from typing import Any

from service.errors import ModelError
from service.forget import ForgetRequest


class DaemonAdmin:
    """Implements ``service.grpc``'s AdminHandler protocol for a running daemon."""

    def __init__(self, daemon: Any) -> None:
        self.daemon = daemon

    async def rollback(self, version: int | None) -> int:
        """Republish an earlier version as the newest and serve it; return the new version.

        Automatic exports pause so the rolled-back model keeps serving while the learner goes on
        learning; an ``Export`` call (``eddy.v1.Admin/Export``) resumes them.
        """
        from service.served_model import load_served_model

        registry, slot = self.daemon.registry, self.daemon.slot
        if self.daemon.loop is not None:
            await asyncio.wrap_future(self.daemon.loop.submit(self.daemon.loop.pause_exports))
        new_version = await asyncio.to_thread(registry.rollback, version)
        model = await asyncio.to_thread(load_served_model, registry.path(new_version), self.daemon.backbone,
                                        version=new_version)
        slot.swap(model)
        return int(new_version)

    async def export(self) -> int:
        """Export the learner's head now; return the served version afterwards."""
        loop = self._loop()
        version = await asyncio.wrap_future(loop.submit(loop.export_now))
        current = self.daemon.slot.get()
        return int(version if version is not None else (current.version if current else 0))

    async def forget(self, ids: list[str], label: str | None) -> dict[str, Any]:
        """Forget events by id and/or a whole label, then export."""
        loop = self._loop()
        request = ForgetRequest(tuple(ids), label)

        def forget_durably() -> dict[str, Any]:
            # Unlike the control topic, nothing in Kafka replays this request: snapshot before replying.
            outcome = loop.forget(request)
            loop.snapshot("forget")
            return dict(outcome)

        result = await asyncio.wrap_future(loop.submit(forget_durably))
        await asyncio.wrap_future(loop.submit(loop.export_now))
        return dict(result)

    def _loop(self) -> Any:
        if self.daemon.loop is None:
            raise ModelError("this process does not learn (role 'serve'): send admin calls to a learner")
        return self.daemon.loop
