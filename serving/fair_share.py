"""Fair share of the engine between tenants: a virtual counter of the service each has received.

This is the Virtual Token Counter of Sheng et al., "Fairness in Serving Large Language Models"
(OSDI 2024). Each tenant's counter grows by the tokens the engine computes for it, weighted
(a prefill token costs 1, a decode token :data:`DECODE_COST`) and divided by the tenant's weight.
The scheduler admits from the tenant with the lowest counter; a tenant that becomes active is
lifted to the lowest counter among the active ones, so that time spent idle banks no credit and
a newcomer neither starves nor floods the others. Shares of running slots and KV blocks are in
proportion to the weights of the tenants that have requests.

One owner: the scheduler calls :meth:`FairShare.arrive` and :meth:`FairShare.leave` as requests
enter and leave it, and :meth:`FairShare.charge` for every chunk it schedules.
"""

from __future__ import annotations

from dataclasses import dataclass

DECODE_COST = 2.0
"""Counter units of a decode token, a prefill token costing 1 (the paper's w_q / w_p)."""


@dataclass(slots=True)
class TenantAccount:
    weight: float = 1.0
    """Its share relative to the others' (the API keys file's ``weight=``; default 1)."""
    served: float = 0.0
    """The virtual counter: weighted tokens served, divided by ``weight``."""
    tokens: int = 0
    """Prefill and decode tokens computed for it (unweighted)."""
    requests: int = 0
    """Its requests in the scheduler (waiting or running)."""
    preemptions: int = 0
    """Its requests preempted (by the pool running out, or for another tenant's share)."""


class FairShare:
    """Per-tenant counters and shares."""

    def __init__(self) -> None:
        self.accounts: dict[str, TenantAccount] = {}

    def arrive(self, tenant: str, weight: float) -> None:
        """A request of ``tenant`` enters the scheduler (``weight``: the tenant's, as of now)."""
        if weight <= 0:
            raise ValueError(f"a tenant's weight must be > 0, got {weight}")
        account = self.accounts.get(tenant)
        if account is None:
            account = self.accounts[tenant] = TenantAccount()
        account.weight = weight
        if account.requests == 0:  # active again: no credit for the time it was idle
            active = [a.served for a in self.accounts.values() if a.requests > 0]
            everyone = [a.served for a in self.accounts.values()]
            account.served = max(account.served, min(active) if active else max(everyone))
        account.requests += 1

    def leave(self, tenant: str) -> None:
        """A request of ``tenant`` left the scheduler (finished or aborted)."""
        account = self.accounts[tenant]
        assert account.requests > 0, f"tenant {tenant!r} left more often than it arrived"
        account.requests -= 1

    def charge(self, tenant: str, prefill: int, decode: int) -> None:
        """``tenant`` is served ``prefill`` prompt (or recomputed) tokens and ``decode`` new
        ones."""
        account = self.accounts[tenant]
        account.served += (prefill + DECODE_COST * decode) / account.weight
        account.tokens += prefill + decode

    def served(self, tenant: str) -> float:
        return self.accounts[tenant].served

    def share(self, tenant: str, total: int) -> float:
        """``tenant``'s fair part of ``total`` (slots or blocks) among the active tenants."""
        weights = sum(a.weight for a in self.accounts.values() if a.requests > 0)
        account = self.accounts[tenant]
        return total * account.weight / max(weights, account.weight)
