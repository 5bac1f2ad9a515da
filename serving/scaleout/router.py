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
"""

from __future__ import annotations

import random
from collections import Counter
from typing import Any

from ray.serve.request_router import (
    MultiplexMixin,
    PendingRequest,
    ReplicaID,
    RequestRouter,
    RunningReplica,
)


class AdapterAffinityRouter(MultiplexMixin, RequestRouter):
    """Requests of a model id go to its holders (others only if every holder is full or
    unreachable); requests without one go to the less busy of two random replicas."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._placements: dict[str, ReplicaID] = {}
        """Model ids this router sent to a replica that has not reported them yet."""

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        if pending_request is not None:
            pending_request.routing_context.should_backoff = True  # no busy loop when all full
        model_id = pending_request.metadata.multiplexed_model_id if pending_request else ""
        if not model_id or not candidate_replicas:
            return [random.sample(candidate_replicas, min(2, len(candidate_replicas)))]
        holders = self.holders(model_id)
        if not holders:
            holders = [self._place(model_id, candidate_replicas)]
        others = [r for r in candidate_replicas if r not in holders]
        return [holders, others]

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
