"""Call logging: one structured line per call on the logger "clowderd.calls", whatever the call's end
(answered, refused or failed), with who called, how it ended, the tokens and the time it took. The
prompt and the answer are never logged. Set the logger's level above INFO to silence it.

The factory reads nothing: every chain logs its calls.
"""
from __future__ import annotations

import logging

from clowderd.middleware.base import Call, Middleware, Outcome

log = logging.getLogger("clowderd.calls")


class CallLog(Middleware):
    name = "call-log"

    async def on_outcome(self, call: Call, outcome: Outcome) -> None:
        if not log.isEnabledFor(logging.INFO):
            return
        usage = outcome.usage or {}
        log.info("call", extra={
            "call": call.id, "deployment": call.model, "method": call.method, "principal": call.principal,
            "client": call.client, "status": outcome.status, "finish_reasons": outcome.finish_reasons,
            "prompt_tokens": usage.get("prompt_tokens"), "completion_tokens": usage.get("completion_tokens"),
            "seconds": round(outcome.seconds, 6), "replica": outcome.replica, "error": outcome.error})


def create(config: dict, policy, shared) -> Middleware | None:
    return CallLog()
