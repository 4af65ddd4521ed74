"""KVCacheManager: which blocks each sequence holds, shared prefixes, and the prefix cache.

Only the scheduler calls it. Every block is in exactly one of three states:

* used: referenced by at least one sequence's block table (reference-counted, so forks for
  n > 1 samples and beams share their common prefix; writing into a shared block copies it
  first: copy-on-write);
* cached-free: referenced by nobody but holding a full block of known tokens, findable by its
  hash; it is reused by a later request with the same prefix, or evicted (least recently used
  first) when a new block is needed;
* free: holding nothing anyone can find.

So ``num_free_blocks + num_cached_free_blocks + num_used_blocks == num_blocks`` always.

Prefix caching: a full block is identified by a hash of (the previous block's hash, the
block's token ids, extra keys such as the request's ``cache_salt``), so equal hashes mean an
equal whole prefix. A new sequence reuses the longest run of cached blocks that starts its
tokens (always leaving its last token to compute, since its logits are needed).
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict, deque
from dataclasses import dataclass

from tokenmill.engine.request import Sequence


def hash_block(parent: bytes | None, token_ids: list[int], extra: str | None) -> bytes:
    """The identity of a full block: sha256 over its parent's hash, its tokens and the extra key."""
    h = hashlib.sha256(parent or b"root")
    h.update(array("q", token_ids).tobytes())
    if extra is not None:
        h.update(b"\0salt\0" + extra.encode())
    return h.digest()


@dataclass
class BlockCopy:
    """Copy block ``src`` into block ``dst`` in every layer before the next forward (copy-on-write)."""

    src: int
    dst: int


class KVCacheManager:
    """Blocks per sequence (keyed by ``Sequence.seq_id``), with prefix caching when enabled."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._refs = [0] * num_blocks
        self._num_shared = 0  # blocks with more than one reference (a prefix-cache hit, forked samples/beams)
        self._free: deque[int] = deque(range(num_blocks))
        self._evictable: OrderedDict[int, None] = OrderedDict()  # cached-free blocks, least recently used first
        self._block_hash: list[bytes | None] = [None] * num_blocks
        self._cached: dict[bytes, int] = {}  # hash -> block holding it
        self._tables: dict[int, list[int]] = {}  # seq_id -> block table
        self._seq_hashes: dict[int, list[bytes]] = {}  # seq_id -> hashes of its full blocks of tokens

    # ---- counts -----------------------------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        """Blocks holding nothing findable."""
        return len(self._free)

    @property
    def num_cached_free_blocks(self) -> int:
        """Blocks nobody uses that still hold a cached prefix (reusable, evictable)."""
        return len(self._evictable)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free) - len(self._evictable)

    @property
    def num_shared_blocks(self) -> int:
        """Used blocks that more than one sequence holds (a cached prefix in use twice, forked samples or beams)."""
        return self._num_shared

    @property
    def num_available_blocks(self) -> int:
        """Blocks a new allocation may take (free, or cached-free after eviction)."""
        return len(self._free) + len(self._evictable)

    def blocks_for(self, num_tokens: int) -> int:
        """Blocks needed to hold num_tokens tokens."""
        return -(-num_tokens // self.block_size)

    def ref_count(self, block: int) -> int:
        return self._refs[block]

    def block_table(self, seq: Sequence) -> list[int]:
        """seq's blocks in position order (read it, don't change it)."""
        return self._tables.get(seq.seq_id, [])

    # ---- the scheduler's calls --------------------------------------------------------------

    def get_computed_blocks(self, seq: Sequence, cache_salt: str | None = None) -> tuple[list[int], int]:
        """The cached blocks that hold seq's longest cached prefix, and how many tokens they cover.

        Takes no reference: pass the blocks to ``allocate_slots`` in the same step. The last token
        is never served from the cache (its logits are needed), so at most num_tokens - 1.
        """
        if not self.enable_prefix_caching or seq.num_computed_tokens > 0:
            return [], 0
        hashes = self._hashes(seq, cache_salt, (seq.num_tokens - 1) // self.block_size)
        blocks = []
        for h in hashes:
            block = self._cached.get(h)
            if block is None:
                break
            blocks.append(block)
        return blocks, len(blocks) * self.block_size

    def allocate_slots(self, seq: Sequence, num_new_tokens: int, num_lookahead_tokens: int = 0,
                       new_computed_blocks: list[int] | tuple[int, ...] = ()) -> list[BlockCopy] | None:
        """Make room for seq's next num_new_tokens (+ lookahead) tokens after its computed ones.

        new_computed_blocks (from get_computed_blocks) join the table first and count as computed.
        Returns the block copies the cache tensors must do before the forward (copy-on-write of
        shared blocks written into), or None, changing nothing, when there are not enough blocks.
        """
        table = self._tables.setdefault(seq.seq_id, [])
        num_computed = seq.num_computed_tokens + len(new_computed_blocks) * self.block_size
        total = num_computed + num_new_tokens + num_lookahead_tokens
        reviving = sum(1 for b in new_computed_blocks if self._refs[b] == 0)
        shared = self._shared_blocks_to_write(table, num_computed, total)
        grow = max(0, self.blocks_for(total) - len(table) - len(new_computed_blocks))
        if grow + len(shared) + reviving > self.num_available_blocks:
            return None
        for block in new_computed_blocks:
            self._ref(block)
            table.append(block)
        copies = []
        for index in shared:
            old, new = table[index], self._take()
            self._add_ref(old, -1)
            table[index] = new
            copies.append(BlockCopy(old, new))
        for _ in range(grow):
            table.append(self._take())
        return copies

    def cache_full_blocks(self, seq: Sequence, cache_salt: str | None = None) -> None:
        """Register seq's full, computed blocks in the prefix cache (call after its tokens are computed)."""
        if not self.enable_prefix_caching:
            return
        table = self._tables.get(seq.seq_id, [])
        num_full = min(seq.num_computed_tokens // self.block_size, len(table))
        for index, h in enumerate(self._hashes(seq, cache_salt, num_full)):
            block = table[index]
            if self._block_hash[block] is None and h not in self._cached:
                self._block_hash[block] = h
                self._cached[h] = block

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """Give child the parent's blocks (shared, reference-counted)."""
        self.free(child)
        table = list(self._tables.get(parent.seq_id, []))
        for block in table:
            self._add_ref(block, 1)
        self._tables[child.seq_id] = table
        if parent.seq_id in self._seq_hashes:
            self._seq_hashes[child.seq_id] = list(self._seq_hashes[parent.seq_id])

    def truncate(self, seq: Sequence, num_tokens: int) -> None:
        """Keep only the KV of seq's first num_tokens tokens (e.g. after rejected draft tokens)."""
        table = self._tables.get(seq.seq_id, [])
        keep = self.blocks_for(num_tokens)
        for block in reversed(table[keep:]):
            self._release(block)
        del table[keep:]
        if num_tokens % self.block_size and table:
            last = table[-1]
            if self._block_hash[last] is not None and self._refs[last] == 1:
                self._uncache(last)  # it will be written again: its cached identity no longer holds
        hashes = self._seq_hashes.get(seq.seq_id)
        if hashes is not None:
            del hashes[num_tokens // self.block_size:]

    def free(self, seq: Sequence) -> None:
        """Drop seq's references; its last blocks go first, so a shared prefix stays cached longest."""
        for block in reversed(self._tables.pop(seq.seq_id, [])):
            self._release(block)
        self._seq_hashes.pop(seq.seq_id, None)

    # ---- internals --------------------------------------------------------------------------

    def _hashes(self, seq: Sequence, cache_salt: str | None, num_blocks: int) -> list[bytes]:
        """Hashes of seq's first num_blocks full blocks of tokens (computed once per sequence)."""
        hashes = self._seq_hashes.setdefault(seq.seq_id, [])
        bs = self.block_size
        while len(hashes) < num_blocks:
            i = len(hashes)
            hashes.append(hash_block(hashes[-1] if hashes else None, seq.token_ids[i * bs:(i + 1) * bs],
                                     cache_salt))
        return hashes[:num_blocks]

    def _shared_blocks_to_write(self, table: list[int], num_computed: int, total: int) -> list[int]:
        """Indices in table of shared blocks that tokens [num_computed, total) land in."""
        if total <= num_computed:
            return []
        first = num_computed // self.block_size
        last = min(self.blocks_for(total), len(table))
        return [i for i in range(first, last) if self._refs[table[i]] > 1]

    def _take(self) -> int:
        """A block for new contents: a free one, else the least recently used cached-free one."""
        if self._free:
            block = self._free.popleft()
        else:
            block, _ = self._evictable.popitem(last=False)
            self._uncache(block)
        self._refs[block] = 1
        return block

    def _ref(self, block: int) -> None:
        if self._refs[block] == 0:
            del self._evictable[block]
        self._add_ref(block, 1)

    def _add_ref(self, block: int, delta: int) -> None:
        """Change a block's reference count by +1 or -1, keeping the count of shared blocks."""
        before = self._refs[block]
        self._refs[block] = before + delta
        self._num_shared += (before + delta > 1) - (before > 1)

    def _release(self, block: int) -> None:
        self._add_ref(block, -1)
        if self._refs[block] == 0:
            if self._block_hash[block] is not None:
                self._evictable[block] = None  # most recently used end
            else:
                self._free.append(block)

    def _uncache(self, block: int) -> None:
        h = self._block_hash[block]
        if h is not None and self._cached.get(h) == block:
            del self._cached[h]
        self._block_hash[block] = None
