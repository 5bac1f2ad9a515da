"""Ray Serve's multiplexed routing, with the first request of an adapter remembered.

Ray Serve routes a request that names a multiplexed model id to the replicas that report holding
it. A replica reports an id when it starts loading it, and the report reaches the router a
moment later (about 0.1-0.3 s, through the controller). Until then the default router spreads
the id's requests over the replicas with the fewest models, so a burst of first requests loads
one adapter's prefix on several replicas and splits its traffic for good. (Its FIFO matching
may also hand a replica found for one request to an older request of another adapter.)

:class:`AdapterAffinityRouter` is a Ray Serve request router (``request_router_class``, the
public extension point) that keeps the multiplexing rule and closes that gap: it places a model
id that no replica reports on the replica with the fewest models (counting its own pending
placements), sends that id's next requests there too, and forgets the placement once a report
names a holder. It runs in the process that holds the deployment handle: the front end.

It also keeps conversations where their KV blocks are cached. Each request carries
:func:`affinity_keys`: hashes of its leading tokens at 1, 2, 4, 8, ... blocks (with its tenant,
adapter and cache salt, as the engine's prefix cache scopes its blocks). The router remembers
which replica each key was last sent to, and sends a request to the replica of its deepest
known key: a conversation's next turn to the replica that holds its history, a new conversation
to one that holds its system prompt. When that replica's queue is ``imbalance`` requests longer
than the shortest candidate's, the request goes by load instead.
"""

from __future__ import annotations

import hashlib
import random
from collections import Counter, OrderedDict
from collections.abc import Sequence
from typing import Any

from ray.serve.request_router import (
    MultiplexMixin,
    PendingRequest,
    ReplicaID,
    RequestRouter,
    RunningReplica,
)

AFFINITY_BLOCK = 16
"""Tokens per step of :func:`affinity_keys` (the engine's default block size)."""
MAX_AFFINITY_KEYS = 1 << 16
"""Affinity keys the router remembers (least recently used forgotten first)."""


def affinity_keys(
    token_ids: Sequence[int], scope: str, block: int = AFFINITY_BLOCK
) -> tuple[str, ...]:
    """Hashes of ``scope`` and the first 1, 2, 4, 8, ... full blocks of ``token_ids``
    (shallowest first); empty for a prompt shorter than a block. ``scope`` names who may share
    the cached blocks (tenant, adapter, salt): keys of different scopes never match."""
    keys = []
    n, h = 1, hashlib.blake2b(scope.encode("utf-8", "surrogatepass"), digest_size=12)
    done = 0
    while n * block <= len(token_ids):
        h.update(",".join(map(str, token_ids[done * block : n * block])).encode())
        keys.append(h.copy().hexdigest())
        done, n = n, 2 * n
    return tuple(keys)


class AdapterAffinityRouter(MultiplexMixin, RequestRouter):
    """Requests of a model id go to its holders (others only if every holder is full or
    unreachable); requests without one go to the less busy of two random replicas. Among
    those, a request goes first to the replica of its deepest known affinity key unless that
    replica is overloaded."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._placements: dict[str, ReplicaID] = {}
        """Model ids this router sent to a replica that has not reported them yet."""
        self._affinity: OrderedDict[str, ReplicaID] = OrderedDict()
        """Affinity key -> the replica its last request went to."""
        self.imbalance = 8
        """Queue length beyond the shortest candidate's at which affinity yields to load."""

    def initialize_state(self, imbalance: int = 8, **kwargs: Any) -> None:
        """``request_router_kwargs``: ``imbalance`` (see :attr:`imbalance`)."""
        self.imbalance = imbalance

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        if pending_request is not None:
            pending_request.routing_context.should_backoff = True  # no busy loop when all full
        model_id = pending_request.metadata.multiplexed_model_id if pending_request else ""
        if not candidate_replicas:
            return []
        if not model_id:
            ranks = [random.sample(candidate_replicas, min(2, len(candidate_replicas)))]
        else:
            holders = self.holders(model_id)
            if not holders:
                holders = [self._place(model_id, candidate_replicas)]
            ranks = [holders, [r for r in candidate_replicas if r not in holders]]
        allowed = ranks[0] if model_id else candidate_replicas
        preferred = self._preferred(pending_request, allowed)
        if preferred is None:
            return ranks
        rest = [r for r in ranks[0] if r is not preferred]
        return [[preferred], *([rest] if rest else []), *ranks[1:]]

    def _preferred(
        self, pending_request: PendingRequest | None, allowed: list[RunningReplica]
    ) -> RunningReplica | None:
        """The replica of the request's deepest known affinity key, if it is ``allowed`` (holds
        the request's adapter) and not overloaded."""
        by_id = {r.replica_id: r for r in allowed}
        for key in reversed(_keys_of(pending_request)):
            replica_id = self._affinity.get(key)
            if replica_id is None or replica_id not in by_id:
                continue
            if self._overloaded(replica_id, list(by_id)):
                return None
            return by_id[replica_id]
        return None

    def _overloaded(self, replica_id: ReplicaID, others: list[ReplicaID]) -> bool:
        cache = self.replica_queue_len_cache
        mine = cache.get(replica_id)
        lengths = [n for r in others if (n := cache.get(r)) is not None]
        return mine is not None and bool(lengths) and mine >= min(lengths) + self.imbalance

    def on_request_routed(
        self, pending_request: PendingRequest, replica_id: ReplicaID, result: Any
    ) -> None:
        for key in _keys_of(pending_request):
            self._affinity[key] = replica_id
            self._affinity.move_to_end(key)
        while len(self._affinity) > MAX_AFFINITY_KEYS:
            self._affinity.popitem(last=False)

    def holders(self, model_id: str) -> list[RunningReplica]:
        """The replicas that hold ``model_id`` (reported, else placed by this router)."""
        reported = self._multiplexed_model_id_to_replica_ids.get(model_id, set())
        if reported:
            self._placements.pop(model_id, None)
        else:
            placed = self._placements.get(model_id)
            reported = {placed} if placed is not None else set()
        return [self._replicas[r] for r in reported if r in self._replicas]

    def _place(self, model_id: str, replicas: list[RunningReplica]) -> RunningReplica:
        pending = Counter(self._placements.values())
        load = {
            r.replica_id: len(r.multiplexed_model_ids) + pending[r.replica_id] for r in replicas
        }
        fewest = min(load.values())
        chosen = random.choice([r for r in replicas if load[r.replica_id] == fewest])
        self._placements[model_id] = chosen.replica_id
        return chosen

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        super().update_replicas(replicas)
        reported = self._multiplexed_model_id_to_replica_ids
        self._placements = {
            model_id: replica
            for model_id, replica in self._placements.items()
            if replica in self._replicas and not reported.get(model_id)
        }

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        self._placements = {m: r for m, r in self._placements.items() if r != replica_id}
        for key in [k for k, r in self._affinity.items() if r == replica_id]:
            del self._affinity[key]


def _keys_of(pending_request: PendingRequest | None) -> tuple[str, ...]:
    """The affinity keys a request carries (its job's ``affinity``), or none."""
    if pending_request is None or not pending_request.args:
        return ()
    return getattr(pending_request.args[0], "affinity", ())
