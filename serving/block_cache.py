"""Automatic prefix caching: full blocks of requests' own tokens, found again by content.

A full block of a request's own tokens is named by a hash chained over its tokens and the previous
block's hash, starting from a **root** that names everything in front of the request's own tokens
and everyone allowed to share them::

    root     = H("root", adapter identity or none, tenant or "*shared*", cache_salt or none)
    block[0] = H(root,     tokens[0:bs])
    block[i] = H(block[i-1], tokens[i*bs:(i+1)*bs])

The adapter identity is its name and the serial of its load, so a reloaded adapter never reuses
the blocks of the old one; the tenant keeps one tenant's time to first token from revealing
another's prompts. Hashes are BLAKE2b (128 bits): a tenant cannot craft a collision to read
another's blocks.

Life of a block (one owner of this state: :class:`BlockCache`):

* a step is scheduled that fills a block of a request: the request **registers** it (reference
  count 1, the request's own), so that requests admitted later in the same step take it too
  (each layer writes the step's K/V before anyone reads them); a step that fails **forgets** the
  blocks it registered;
* a new request with the same root and leading tokens **takes** it (count + 1) and computes only
  the rest; it never writes into it (the last prompt token is always computed, in a later block);
* a request that ends or is preempted **releases** its blocks: private ones go back to the
  allocator, cached ones lose a reference and at zero become **idle**: still cached, evictable;
* the pool evicts idle blocks least recently used first, in one LRU with idle adapter prefixes
  (:meth:`~prefixserve.prefix_store.PrefixStore.make_room`), before any request is preempted.

A block registered twice (two requests computed the same tokens at once) stays private to the
second: the first copy is the cached one.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from itertools import count

import numpy as np

from .kv_cache import BlockAllocator

BlockHash = bytes


def cache_root(
    adapter: tuple[str, int] | None, tenant: str | None, cache_salt: str | None
) -> BlockHash:
    """The root of a request's block hashes. ``adapter``: ``(name, load serial)`` or None;
    ``tenant``: who may share the blocks (None: every tenant, for public adapters when the
    server allows it); ``cache_salt``: narrows sharing further (one user of a tenant)."""
    h = hashlib.blake2b(digest_size=16)
    for part in (
        "root",
        "none" if adapter is None else f"adapter:{adapter[1]}:{adapter[0]}",
        "*shared*" if tenant is None else f"tenant:{tenant}",
        "none" if cache_salt is None else f"salt:{cache_salt}",
    ):
        data = part.encode("utf-8", "surrogatepass")
        h.update(len(data).to_bytes(8, "little"))  # length-prefixed: no two splits collide
        h.update(data)
    return h.digest()


def block_hash(parent: BlockHash, tokens: Sequence[int]) -> BlockHash:
    """The hash of a full block of ``tokens`` following the block (or root) hashed ``parent``."""
    h = hashlib.blake2b(parent, digest_size=16)
    h.update(np.asarray(tokens, dtype=np.int64).tobytes())
    return h.digest()


@dataclass(slots=True)
class CacheStats:
    queries: int = 0
    """Prompt tokens looked up (admissions of requests that may use the cache)."""
    hits: int = 0
    """Of those, tokens found cached (not computed)."""
    evictions: int = 0
    """Idle cached blocks evicted for room."""


class BlockCache:
    """Owns which blocks of the pool are cached, their hashes and reference counts, and the LRU
    order of the idle ones. Blocks come from and go back to ``allocator``."""

    def __init__(self, allocator: BlockAllocator, block_size: int) -> None:
        self.allocator = allocator
        self.block_size = block_size
        self._clock = count(1)
        """The pool's LRU clock (the prefix store stamps prefixes with it too)."""
        self._by_hash: dict[BlockHash, int] = {}
        self._hash_of: dict[int, BlockHash] = {}
        self._refs: dict[int, int] = {}
        """Cached block -> requests holding it (0: idle)."""
        self.idle: OrderedDict[int, int] = OrderedDict()
        """Idle cached blocks -> when they became idle, least recently used first."""
        self.stats = CacheStats()

    def tick(self) -> int:
        """The next stamp of the pool's LRU clock."""
        return next(self._clock)

    @property
    def num_cached(self) -> int:
        """Blocks the cache holds (in use and idle)."""
        return len(self._hash_of)

    def is_cached(self, block: int) -> bool:
        return block in self._hash_of

    def refs(self, block: int) -> int:
        """Requests holding cached ``block`` (0: idle)."""
        return self._refs[block]

    def lookup(self, hashes: Iterable[BlockHash]) -> list[int]:
        """Cached blocks of the longest leading run of ``hashes`` (not taken yet)."""
        blocks = []
        for h in hashes:
            block = self._by_hash.get(h)
            if block is None:
                break
            blocks.append(block)
        return blocks

    def take(self, blocks: Iterable[int]) -> None:
        """One more request holds each of the cached ``blocks``."""
        for block in blocks:
            refs = self._refs[block]
            if refs == 0:
                del self.idle[block]
            self._refs[block] = refs + 1

    def register(self, block: int, h: BlockHash) -> bool:
        """Cache the full, computed ``block`` of one request under ``h`` (held by that request);
        False if another block holds ``h`` already (``block`` stays private)."""
        assert block not in self._hash_of, f"block {block} is cached already"
        if h in self._by_hash:
            return False
        self._by_hash[h] = block
        self._hash_of[block] = h
        self._refs[block] = 1
        return True

    def release(self, blocks: Sequence[int]) -> None:
        """A request lets go of its ``blocks`` (its whole table, in order): private blocks are
        freed, cached ones lose a reference. Released last block first, so that when nobody
        uses them a chain's tail is evicted before its head (a head without its tail still
        serves shorter prompts; a tail without its head serves nobody)."""
        private = []
        for block in reversed(blocks):
            refs = self._refs.get(block)
            if refs is None:
                private.append(block)
            elif refs == 1:
                self._refs[block] = 0
                self.idle[block] = self.tick()
            else:
                self._refs[block] = refs - 1
        self.allocator.free(private)

    def oldest_idle(self) -> int | None:
        """When the least recently used idle block became idle; None if none is."""
        return next(iter(self.idle.values()), None)

    def evict_oldest(self) -> None:
        """Evict the least recently used idle block (its hash forgotten, the block freed)."""
        self._drop(next(iter(self.idle)))
        self.stats.evictions += 1

    def forget(self, blocks: Iterable[int]) -> None:
        """Drop ``blocks``, cached as a step that then failed was scheduled (their K/V may be
        half written), once every request of that step has let them go (all idle by then)."""
        for block in blocks:
            if block in self._hash_of:
                assert self._refs[block] == 0, f"block {block} of a failed step is still held"
                self._drop(block)

    def _drop(self, block: int) -> None:
        del self.idle[block]
        del self._by_hash[self._hash_of.pop(block)]
        del self._refs[block]
        self.allocator.free([block])

    def clear_idle(self) -> int:
        """Evict every idle block; returns how many (``reset_prefix_cache``)."""
        n = len(self.idle)
        for _ in range(n):
            self.evict_oldest()
        return n
