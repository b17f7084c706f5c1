"""The certificates the controller issues with the cluster CA: to joining nodes, at renewals, to the
holder of the admin token, and to its own process. Every one is recorded (state.certificates), so that
revoking a node revokes each certificate it holds.
"""
from __future__ import annotations

import datetime as dt
import time
from typing import Iterable

from cryptography.hazmat.primitives.asymmetric import ec

from clowder.v1 import controller_pb2
from clowderd.controller.cluster import DEPLOYMENTS, TRUST, Cluster
from clowderd.controller.timestamps import timestamp
from clowderd.trust import certs
from clowderd.trust.authz import Revocations
from clowderd.trust.ca import ClusterCA

ADMIN_CERTIFICATE_LIFETIME = dt.timedelta(hours=1)


class Certifier:
    def __init__(self, cluster: Cluster, ca: ClusterCA, lifetime_seconds: float, revocations: Revocations):
        self.cluster = cluster
        self.ca = ca
        self.lifetime = dt.timedelta(seconds=lifetime_seconds)
        self.revocations = revocations  # this process's: its listeners refuse a revoked certificate at once

    def issue(self, public_key: ec.EllipticCurvePublicKey, node_id: str, name: str, roles: Iterable[str],
              lifetime: dt.timedelta | None = None) -> tuple[controller_pb2.IssuedCertificate, certs.Holder]:
        """A certificate naming node_id, name and roles; not recorded yet (see `record`)."""
        cert = self.ca.issue(public_key, node_id=node_id, name=name, roles=roles, lifetime=lifetime or self.lifetime)
        holder = certs.holder(cert)
        return controller_pb2.IssuedCertificate(
            certificate=certs.certificate_pem(cert), ca_certificates=self.ca.bundle,
            not_after=timestamp(holder.not_after), serial=holder.serial), holder

    async def record(self, holder: certs.Holder) -> None:
        await self.cluster.call(self.cluster.state.record_certificate, holder.serial, holder.node_id, holder.name,
                                holder.roles, holder.not_after, time.time())

    async def issue_recorded(self, public_key: ec.EllipticCurvePublicKey, node_id: str, name: str,
                             roles: Iterable[str], lifetime: dt.timedelta | None = None
                             ) -> tuple[controller_pb2.IssuedCertificate, certs.Holder]:
        issued, holder = self.issue(public_key, node_id, name, roles, lifetime)
        await self.record(holder)
        return issued, holder

    async def revoked(self, serials: Iterable[str]) -> None:
        """Certificates were revoked: refuse them here at once, and tell every node (WatchTrust)."""
        if serials:
            self.revocations.replace(await self.cluster.call(self.cluster.state.revoked_serials, time.time()))
            self.cluster.changes.publish(TRUST)
            self.cluster.changes.publish(DEPLOYMENTS)  # the route watches end too
