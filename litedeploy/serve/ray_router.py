"""Prefix-cache-aware request router for `litedeploy serve ray` (Ray Serve's RequestRouter).

Each request carries a routing key: the first characters of its prompt (`ray_app.HttpCall`).
Rendezvous hashing ranks the replicas for that key, so requests sharing a long prompt prefix go to
the replica that already holds the prefix's KV blocks, every ingress replica (each runs its own
router) agrees without shared state, and a replica joining or leaving moves only its own keys.
When the preferred replica's queue is `imbalanced_threshold` requests longer than the shortest
one, the least-loaded replica goes first: a hot prefix must not starve the other replicas.
Requests without a prompt (GET /metrics, /v1/models) go to the least-loaded replica; one that names
a replica (`replica_id`, the X-Litedeploy-Replica header) goes to it while it lives.
"""

from __future__ import annotations

import hashlib
from typing import Any

from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

# Queue-length difference above which load beats prefix affinity.
IMBALANCED_THRESHOLD = 16


def _routing_fields(pending_request: PendingRequest | None) -> tuple[str | None, str | None]:
    """(routing_key, replica_id) of the request's HttpCall argument, if it has one."""
    for arg in pending_request.args if pending_request is not None else ():
        if hasattr(arg, "routing_key"):
            return arg.routing_key, arg.replica_id
    return None, None


def _score(key: str, replica: RunningReplica) -> bytes:
    return hashlib.blake2b(f"{key}\0{replica.replica_id.unique_id}".encode(),
                           digest_size=8).digest()


class PrefixAffinityRouter(RequestRouter):
    # A replica that misses the queue-length probe's deadline is passed over for the next rank.
    # Ray's 0.1 s suits replicas whose event loop is idle; ours answer while an engine prefills on
    # every core, and under that load a missed probe sent a cached prefix to the other replica.
    queue_len_response_deadline_s = 1.0
    max_queue_len_response_deadline_s = 2.0

    def initialize_state(self, imbalanced_threshold: int = IMBALANCED_THRESHOLD, **_: Any) -> None:
        self.imbalanced_threshold = imbalanced_threshold

    def _queue_len(self, replica: RunningReplica) -> int:
        # unknown (not probed yet) counts as empty: the base class probes before sending
        return self.replica_queue_len_cache.get(replica.replica_id) or 0

    def rank(self, candidates: list[RunningReplica], key: str | None,
             replica_id: str | None) -> list[list[RunningReplica]]:
        """Ranks of replicas, most preferred first; the base class takes the first rank with a
        replica that has room, and backs off when none has."""
        if replica_id is not None:
            pinned = [r for r in candidates if r.replica_id.unique_id == replica_id]
            if pinned:
                return [pinned]
        if key is None:
            return [candidates]  # the base class picks the shortest queue among them
        ranked = sorted(candidates, key=lambda r: _score(key, r), reverse=True)
        least = min(ranked, key=self._queue_len)
        if self._queue_len(ranked[0]) - self._queue_len(least) >= self.imbalanced_threshold:
            ranked.remove(least)
            ranked.insert(0, least)
        return [[replica] for replica in ranked]

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        if pending_request is not None:
            # every rank was tried: wait a little before the next round (else a busy loop)
            pending_request.routing_context.should_backoff = True
        key, replica_id = _routing_fields(pending_request)
        return self.rank(candidate_replicas, key, replica_id)
