"""Adapters' prefix K/V as shared, read-only blocks of the paged pool.

A loaded adapter is a :class:`Prefix`. Every request naming it holds a reference from the moment
it is accepted until it ends (``requests``); running requests also pin it (``users``). An unpinned
prefix stays resident until the pool needs blocks, then the least recently used is evicted; the
adapter's host copy stays, so an evicted prefix is materialized again on its next use. Unloading
an adapter that requests still hold takes effect when the last of them ends.

The pool has one eviction policy, here (:meth:`PrefixStore.make_room`): idle adapter prefixes and
idle cached blocks of requests' own tokens (:mod:`~prefixserve.block_cache`) are evicted together,
least recently used first, before the scheduler preempts anyone.
"""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass, field

from .adapters import (
    Adapter,
    AdapterError,
    AdapterNameTakenError,
    AdapterNotFoundError,
)
from .block_cache import BlockCache
from .kv_cache import BlockAllocator, blocks_for
from .text import shorten
from .types import AdapterInfo


@dataclass(slots=True, eq=False)
class Prefix:
    adapter: Adapter
    serial: int
    """Which load of the adapter this is: with its name, the root of its requests' cached
    blocks (a reloaded adapter never reuses the old one's)."""
    block_ids: list[int] = field(default_factory=list)
    """Shared blocks holding the prefix K/V; empty while not resident."""
    filled: int = 0
    """Tokens of ``block_ids`` that hold their K/V (filled in chunks, between steps)."""
    requests: int = 0
    """Accepted, unfinished requests naming this adapter (it cannot be unloaded while > 0)."""
    users: int = 0
    """Running requests reading this prefix (it cannot be evicted while > 0)."""
    last_used: int = 0
    """When it was last pinned or let go (the pool's LRU clock)."""
    unloading: bool = False

    @property
    def name(self) -> str:
        return self.adapter.name

    @property
    def num_tokens(self) -> int:
        return self.adapter.num_tokens

    @property
    def resident(self) -> bool:
        return bool(self.block_ids)

    @property
    def materialized(self) -> bool:
        """Whether every token of the prefix has its K/V in the pool."""
        return self.resident and self.filled == self.num_tokens


@dataclass(slots=True)
class PrefixStats:
    hits: int = 0
    """Acquisitions that found the prefix resident and filled."""
    materializations: int = 0
    """Prefixes filled (first use, or again after an eviction)."""
    evictions: int = 0


class PrefixStore:
    """Owns every loaded adapter's prefix and its blocks in the shared pool."""

    def __init__(
        self, allocator: BlockAllocator, block_size: int, bytes_per_block: int, cache: BlockCache
    ) -> None:
        self.allocator = allocator
        self.block_size = block_size
        self.bytes_per_block = bytes_per_block
        self.cache = cache
        """The cached blocks of requests' own tokens, evicted in the same LRU as prefixes."""
        self.prefixes: dict[str, Prefix] = {}
        self.stats = PrefixStats()
        self._serials = itertools.count(1)

    def add(self, adapter: Adapter) -> Prefix:
        self.check_name_free(adapter.name)
        blocks = blocks_for(adapter.num_tokens, self.block_size)
        if blocks > self.allocator.num_blocks:
            raise AdapterError(
                f"adapter {adapter.name!r}: its {adapter.num_tokens} tokens need {blocks} KV "
                f"blocks but the pool has {self.allocator.num_blocks}"
            )
        prefix = Prefix(adapter, serial=next(self._serials))
        self.prefixes[adapter.name] = prefix
        return prefix

    def check_name_free(self, name: str) -> None:
        prefix = self.prefixes.get(name)
        if prefix is None:
            return
        if prefix.unloading:
            raise AdapterNameTakenError(
                f"adapter {shorten(name)} is still being unloaded ({prefix.requests} requests use "
                "it); load it again once they finish, or under another name"
            )
        raise AdapterNameTakenError(f"adapter {shorten(name)} is already loaded; unload it first")

    def get(self, name: str) -> Prefix:
        """The usable prefix named ``name``; ``AdapterError`` if unknown or being unloaded."""
        prefix = self.prefixes.get(name)
        if prefix is None:
            raise AdapterNotFoundError(f"adapter {shorten(name)} is not loaded")
        if prefix.unloading:
            raise AdapterNotFoundError(
                f"adapter {shorten(name)} is being unloaded and takes no new requests"
            )
        return prefix

    def info(self, name: str) -> AdapterInfo:
        prefix = self.prefixes[name]
        return AdapterInfo(
            name=name,
            kind=prefix.adapter.kind.value,
            num_tokens=prefix.num_tokens,
            host_bytes=prefix.adapter.host_bytes,
            kv_bytes=blocks_for(prefix.num_tokens, self.block_size) * self.bytes_per_block,
            resident=prefix.resident,
            requests=prefix.requests,
            unloading=prefix.unloading,
        )

    def remove(self, name: str) -> bool:
        """Unload ``name`` now, or when its last user lets go; True if it is gone already."""
        prefix = self.prefixes.get(name)
        if prefix is None:
            raise AdapterError(f"adapter {name!r} is not loaded")
        prefix.unloading = True
        if prefix.requests == 0:
            self._drop(prefix)
            return True
        return False

    def attach(self, name: str) -> Prefix:
        """A new request names adapter ``name``: hold a reference until :meth:`detach`."""
        prefix = self.get(name)
        prefix.requests += 1
        return prefix

    def detach(self, prefix: Prefix) -> None:
        """A request naming ``prefix`` ended; an unloading prefix goes with its last request."""
        assert prefix.requests > 0, f"prefix {prefix.name!r} detached more often than attached"
        prefix.requests -= 1
        if prefix.requests == 0 and prefix.unloading:
            self._drop(prefix)

    def acquire(self, prefix: Prefix) -> bool:
        """Pin ``prefix`` for one more request, making it resident (evicting LRU unused
        prefixes if needed). False if the pool has no room for it now."""
        if not prefix.resident:
            needed = blocks_for(prefix.num_tokens, self.block_size)
            if not self.make_room(needed, keep=prefix):
                return False
            blocks = self.allocator.allocate(needed)
            assert blocks is not None, "make_room guaranteed the blocks"
            prefix.block_ids = blocks
            prefix.filled = 0
        elif prefix.materialized:
            self.stats.hits += 1
        prefix.users += 1
        prefix.last_used = self.cache.tick()
        return True

    def release(self, prefix: Prefix) -> None:
        """Unpin ``prefix`` for one request (it stays resident until evicted)."""
        assert prefix.users > 0, f"prefix {prefix.name!r} released more often than acquired"
        prefix.users -= 1
        prefix.last_used = self.cache.tick()

    def make_room(self, num_blocks: int, keep: Prefix | None = None) -> bool:
        """Evict what nobody uses (resident prefixes without users, idle cached blocks), least
        recently used first, until ``num_blocks`` blocks are free. False, evicting nothing, if
        even that would not be enough."""
        if self.allocator.num_free >= num_blocks:
            return True
        idle = deque(
            sorted(
                (
                    p
                    for p in self.prefixes.values()
                    if p.resident and p.users == 0 and p is not keep
                ),
                key=lambda p: p.last_used,
            )
        )
        evictable = sum(len(p.block_ids) for p in idle) + len(self.cache.idle)
        if self.allocator.num_free + evictable < num_blocks:
            return False
        while self.allocator.num_free < num_blocks:
            oldest_block = self.cache.oldest_idle()
            if idle and (oldest_block is None or idle[0].last_used < oldest_block):
                self._evict(idle.popleft())
            else:
                self.cache.evict_oldest()
        return True

    def evictable_blocks(self) -> int:
        """Blocks :meth:`make_room` could free now: unused resident prefixes and idle cached
        blocks."""
        idle = sum(len(p.block_ids) for p in self.prefixes.values() if p.resident and not p.users)
        return idle + len(self.cache.idle)

    @property
    def resident_blocks(self) -> int:
        return sum(len(p.block_ids) for p in self.prefixes.values())

    def _evict(self, prefix: Prefix) -> None:
        self.allocator.free(prefix.block_ids)
        prefix.block_ids = []
        prefix.filled = 0
        self.stats.evictions += 1

    def _drop(self, prefix: Prefix) -> None:
        if prefix.resident:
            self.allocator.free(prefix.block_ids)
            prefix.block_ids = []
        del self.prefixes[prefix.name]
