"""The chain of a deployment: the lb's own middleware first (the cluster's policy, by name), then the
built-ins that the aimage's configuration switches on, in a fixed order that makes sense on the way in:

    auth, rate-limit, security, input-filter, conversation, prompts, output-filter, call-log, audit,
    webhooks, query-storage

(on the way out the order reverses: the output filter sees the model's text first, and what is logged,
audited and stored is what the caller received). Third-party middleware registers a factory under the
entry point group "clowder.middleware"; `[lb] middleware = ["name", ...]` puts it in every chain, and a
route from the controller can name more for its deployment (the cluster's policy). A
factory is `create(config, policy, shared) -> Middleware | None`, given the aimage configuration, the
lb's settings and the lb-wide resources; it returns None when the configuration does not ask for it.
"""
from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import Callable

from clowderd.errors import InvalidInput
from clowderd.middleware import (
    audit,
    auth,
    calllog,
    conversation,
    filters,
    prompts,
    querystore,
    ratelimit,
    security,
    webhooks,
)
from clowderd.middleware.base import Chain, Middleware

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "clowder.middleware"
Factory = Callable[[dict, "LbPolicy", "Shared"], "Middleware | None"]


@dataclass
class LbPolicy:
    """The lb's settings that middleware reads."""
    data_dir: Path
    middleware: list[str] = field(default_factory=list)  # the cluster's own, before the built-ins
    keys_file: Path | None = None
    requests_per_minute: int | None = None  # for callers without a limit of their own
    audit_log: Path | None = None           # None: no audit log
    secrets_file: Path | None = None        # the webhooks' signing secrets


@dataclass
class Shared:
    """What the middleware of every deployment shares: made once per lb."""
    data_dir: Path
    keys: auth.KeyRing | None
    summarise: conversation.Summarise  # runs a summary through the deployment's own model
    audit_log: audit.AuditLog | None = None
    webhook_sender: webhooks.WebhookSender = field(default_factory=lambda: webhooks.WebhookSender({}))
    buckets: ratelimit.Buckets = field(default_factory=ratelimit.Buckets)
    _conversations: conversation.ConversationStore | None = None
    _queries: querystore.QueryStore | None = None

    @classmethod
    def open(cls, policy: LbPolicy, summarise: conversation.Summarise) -> "Shared":
        """The resources the policy names: keys, audit log, webhook secrets (each file checked now)."""
        return cls(data_dir=policy.data_dir, summarise=summarise,
                   keys=auth.KeyRing(policy.keys_file) if policy.keys_file else None,
                   audit_log=audit.AuditLog(policy.audit_log) if policy.audit_log else None,
                   webhook_sender=webhooks.WebhookSender(
                       webhooks.load_secrets(policy.secrets_file) if policy.secrets_file else {}))

    def conversations(self) -> conversation.ConversationStore:
        """The conversation history database, opened when a deployment first keeps conversations."""
        if self._conversations is None:
            self._conversations = conversation.ConversationStore(self.data_dir / "conversations.sqlite")
        return self._conversations

    def query_store(self) -> querystore.QueryStore:
        """The stored queries and responses, opened when a deployment first stores them."""
        if self._queries is None:
            self._queries = querystore.QueryStore(self.data_dir / "queries.sqlite")
        return self._queries

    async def close(self, drain_seconds: float = 0.0) -> None:
        """Send what webhooks are queued (for up to drain_seconds), then write and close every file."""
        await self.webhook_sender.close(drain_seconds=drain_seconds)
        for resource in (self.audit_log, self._queries, self._conversations):
            if resource is not None:
                await asyncio.to_thread(resource.close)


BUILTINS: list[tuple[str, Factory]] = [
    ("auth", auth.create),
    ("rate-limit", ratelimit.create),
    ("security", security.create),
    ("input-filter", filters.create_input),
    ("conversation", conversation.create),
    ("prompts", prompts.create),
    ("output-filter", filters.create_output),
    ("call-log", calllog.create),
    ("audit", audit.create),
    ("webhooks", webhooks.create),
    ("query-storage", querystore.create),
]


def load_plugin(name: str) -> Factory:
    """The factory registered under `name` in the entry point group."""
    found = [ep for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.name == name]
    if not found:
        known = sorted(ep.name for ep in entry_points(group=ENTRY_POINT_GROUP))
        raise InvalidInput(f"middleware {name!r} is not installed (no entry point {name!r} in group "
                           f"{ENTRY_POINT_GROUP!r}; installed: {', '.join(known) or 'none'})")
    return found[0].load()


class ChainBuilder:
    """Builds, and keeps, each deployment's chain; a new aimage (manifest digest) gets a new one."""

    def __init__(self, policy: LbPolicy, shared: Shared):
        self.policy = policy
        self.shared = shared
        self.plugins = {name: load_plugin(name) for name in policy.middleware}
        self._chains: dict[tuple[str, str], Chain] = {}

    def __call__(self, route) -> Chain:
        key = (route.deployment, route.manifest_digest)
        chain = self._chains.get(key)
        if chain is None:
            chain = self._chains[key] = self.build(route.config, route.middleware)
            log.info("middleware chain", extra={"deployment": route.deployment, "chain": chain.names()})
        return chain

    def build(self, config: dict, deployment_middleware: list[str] = ()) -> Chain:
        """The lb's own middleware, then the deployment's (as the controller names it), then the built-ins."""
        for name in deployment_middleware:
            if name not in self.plugins:
                self.plugins[name] = load_plugin(name)
        names = list(dict.fromkeys([*self.policy.middleware, *deployment_middleware]))
        made = []
        for name, factory in [(n, self.plugins[n]) for n in names] + BUILTINS:
            middleware = factory(config, self.policy, self.shared)
            if middleware is not None:
                made.append(middleware)
        return Chain(made)

    def forget(self, deployment: str) -> None:
        for key in [k for k in self._chains if k[0] == deployment]:
            del self._chains[key]

