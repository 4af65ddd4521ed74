"""Which engine replica runs a prompt: prefix affinity, else the least-loaded replica.

A prompt is keyed by the hashes of its full KV blocks, the same sha256 chain the prefix cache
files blocks under (``engine/kv_cache_manager.hash_block``): two prompts share a run of leading
hashes exactly when a replica could reuse the cached KV of that run for both. ``PrefixAffinity``
remembers which replica last ran each block hash; a prompt goes to the replica that ran its longest
known prefix while that replica is not overloaded (its queue at most ``imbalance`` requests longer
than the shortest one, scaled by the share of the prompt it holds), otherwise to the least-loaded
replica. So the turns of one conversation
land on the replica that holds the conversation in its cache, and a hot prefix spills over to
other replicas instead of queueing behind itself.

The types that cross the Ray boundary (``ReplicaRequest`` in, ``ReplicaChunk`` out) live here
too, so this module imports nothing from Ray; ``server/replicas.py`` plugs the policy into Ray
Serve's request router.
"""

from __future__ import annotations

import random
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field

from tokenmill.engine.info import EngineStats
from tokenmill.engine.kv_cache_manager import hash_block
from tokenmill.outputs import RequestOutput
from tokenmill.sampling_params import SamplingParams

REPLICA_HEADER = "x-tokenmill-replica"  # names the replica(s) that ran a request
DEFAULT_TABLE_SIZE = 200_000  # block hashes remembered (~ 3.2 M prompt tokens at 16 tokens a block)


def prompt_block_hashes(token_ids: list[int], block_size: int, cache_salt: str | None) -> list[bytes]:
    """The prefix cache's hash of each full block of ``token_ids``, first block first."""
    hashes: list[bytes] = []
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        hashes.append(hash_block(hashes[-1] if hashes else None, token_ids[start:start + block_size], cache_salt))
    return hashes


@dataclass
class ReplicaRequest:
    """One engine request on its way to a replica; the router reads ``block_hashes``."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    prompt: str | None = None
    cache_salt: str | None = None
    block_hashes: list[bytes] = field(default_factory=list)


@dataclass
class ReplicaChunk:
    """What a replica sends back for one request: the outputs since its last chunk (none in the first,
    which says the replica took the request) and the replica's engine stats at that moment."""

    replica: str
    outputs: list[RequestOutput]
    stats: EngineStats
    sent_at: float  # the replica's time.monotonic(): orders one replica's snapshots


class PrefixAffinity:
    """Block hash -> the replica that last ran it (least recently used forgotten first), and the ranking
    of replicas for a prompt.

    imbalance: the prefix's replica is passed over once its queue is this many requests longer than the
    shortest queue (for a prompt it holds whole; proportionally less for a partial match). table_size:
    most block hashes remembered.
    """

    def __init__(self, imbalance: int, table_size: int = DEFAULT_TABLE_SIZE) -> None:
        if imbalance < 0:
            raise ValueError(f"imbalance must be >= 0, got {imbalance}")
        if table_size < 1:
            raise ValueError(f"table_size must be >= 1, got {table_size}")
        self.imbalance = imbalance
        self.table_size = table_size
        self._owner: OrderedDict[bytes, str] = OrderedDict()

    def __len__(self) -> int:
        return len(self._owner)

    def owner(self, block_hashes: list[bytes]) -> tuple[str | None, int]:
        """The replica that ran the longest known prefix of these blocks, and that prefix's length in blocks."""
        for n in range(len(block_hashes), 0, -1):
            replica = self._owner.get(block_hashes[n - 1])
            if replica is not None:
                self._owner.move_to_end(block_hashes[n - 1])
                return replica, n
        return None, 0

    def record(self, block_hashes: list[bytes], replica: str) -> None:
        """``replica`` now holds these blocks in its cache. The first blocks are the most recently used,
        so a prompt's deepest blocks are forgotten before the prefix it shares with others."""
        for h in reversed(block_hashes):
            self._owner[h] = replica
            self._owner.move_to_end(h)
        while len(self._owner) > self.table_size:
            self._owner.popitem(last=False)

    def forget(self, replicas: Iterable[str]) -> None:
        """Drop what gone replicas held (their caches died with them)."""
        gone = set(replicas)
        for h in [h for h, r in self._owner.items() if r in gone]:
            del self._owner[h]

    def rank(self, block_hashes: list[bytes], loads: dict[str, int]) -> list[list[str]]:
        """Replicas in order of preference for a prompt, as groups (the router takes the least-loaded
        replica with room from the first group that has one).

        loads: replica -> requests queued or running on it. The prefix's replica comes first, alone, while
        its queue is at most ``imbalance`` x (the share of the prompt's blocks it holds) longer than the
        shortest queue: a conversation's next turn, most of whose prompt is cached there, waits for its
        replica; a prompt that only shares a short system prompt goes where the queue is shortest (else
        every new conversation would pile onto the replica that ran that system prompt first). Otherwise
        all replicas in one group: the least loaded wins.
        """
        if not loads:
            return []
        owner, matched = self.owner(block_hashes)
        others = [r for r in loads if r != owner]
        random.shuffle(others)  # equal loads are broken at random: idle replicas share new prompts evenly
        allowed = self.imbalance * matched / len(block_hashes) if matched else 0.0
        if owner in loads and loads[owner] - min(loads.values()) <= allowed:
            return [[owner], others]
        return [others + [owner]] if owner in loads else [others]


class RoundRobin:
    """The baseline for comparison: replicas in turn, whatever the prompt."""

    def __init__(self) -> None:
        self._next = 0

    def rank(self, replicas: list[str]) -> list[list[str]]:
        if not replicas:
            return []
        ordered = sorted(replicas)
        start = self._next % len(ordered)
        self._next += 1
        return [[r] for r in ordered[start:] + ordered[:start]]

