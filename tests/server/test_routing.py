"""Prefix-affinity routing and the replicas' metrics, without Ray; and that the one-process server never
imports Ray. The replicas themselves are tested in test_ray_serve.py."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tokenmill.cli import main
from tokenmill.engine.info import EngineStats
from tokenmill.engine.kv_cache_manager import KVCacheManager
from tokenmill.engine.metrics import EngineMetrics
from tokenmill.engine.request import Sequence
from tokenmill.server.replica_metrics import ReplicaStatsBook
from tokenmill.server.routing import PrefixAffinity, RoundRobin, prompt_block_hashes


def test_prompt_keys_are_the_prefix_cache_hashes():
    """A prompt's routing key is what the prefix cache files its blocks under: once one prompt's blocks are
    cached, another prompt hits exactly the blocks whose keys the two share."""
    kv = KVCacheManager(num_blocks=16, block_size=4)
    first = Sequence(seq_id=0, token_ids=list(range(10)), num_prompt_tokens=10)
    kv.allocate_slots(first, 10)
    first.num_computed_tokens = 10
    kv.cache_full_blocks(first, "s")
    for seq_id, other in enumerate(([*range(8), 99, 98, 97], [*range(5), 42, 0, 0, 0, 0, 0], list(range(12))), 1):
        seq = Sequence(seq_id=seq_id, token_ids=other, num_prompt_tokens=len(other))
        _, num_cached = kv.get_computed_blocks(seq, "s")
        keys = zip(prompt_block_hashes(list(range(10)), 4, "s"), prompt_block_hashes(other, 4, "s"))
        shared = next((i for i, (a, b) in enumerate(keys) if a != b), 2)
        assert num_cached == 4 * shared
    assert prompt_block_hashes(list(range(10)), 4, "s") != prompt_block_hashes(list(range(10)), 4, None)
    assert prompt_block_hashes([1, 2, 3], 4, None) == []  # no full block: no key


def test_prefix_goes_to_its_replica_until_it_is_overloaded():
    affinity = PrefixAffinity(imbalance=2)
    turn1 = prompt_block_hashes(list(range(40)), 16, None)  # 2 full blocks
    turn2 = prompt_block_hashes(list(range(80)), 16, None)  # the same 2, then 3 more
    other = prompt_block_hashes([7] * 40, 16, None)
    affinity.record(turn1, "r1")
    affinity.record(other, "r2")
    assert affinity.owner(turn2) == ("r1", 2)
    assert affinity.rank(turn1, {"r1": 3, "r2": 1}) == [["r1"], ["r2"]]  # all cached there, 2 longer: still r1
    assert affinity.rank(turn1, {"r1": 4, "r2": 1}) == [["r2", "r1"]]  # 3 longer: the least-loaded decides
    assert affinity.rank(turn2, {"r1": 1, "r2": 1}) == [["r1"], ["r2"]]  # 2 of 5 blocks there: a tie goes to r1
    assert affinity.rank(turn2, {"r1": 2, "r2": 1}) == [["r2", "r1"]]  # ... but not 1 more (allowed 2 x 2/5)
    assert affinity.rank(turn2, {"r2": 0}) == [["r2"]]  # its replica is gone
    assert sorted(affinity.rank([], {"r1": 0, "r2": 0})[0]) == ["r1", "r2"]  # no key: one group, by load
    affinity.record(turn2, "r2")  # the longest known prefix decides
    assert affinity.owner(turn2) == ("r2", 5)
    affinity.forget(["r2"])
    assert affinity.owner(turn2) == (None, 0) and affinity.owner(turn1) == (None, 0)


def test_prefix_table_forgets_the_least_recently_used():
    affinity = PrefixAffinity(imbalance=0, table_size=3)
    a, b = prompt_block_hashes(list(range(32)), 16, None), prompt_block_hashes([5] * 32, 16, None)
    affinity.record(a, "r1")
    affinity.record(b, "r2")
    assert len(affinity) == 3 and affinity.owner(a) == ("r1", 1)  # a's second block was dropped first
    with pytest.raises(ValueError, match="imbalance"):
        PrefixAffinity(imbalance=-1)


def test_round_robin_takes_turns():
    rr = RoundRobin()
    firsts = [rr.rank(["b", "a", "c"])[0][0] for _ in range(4)]
    assert firsts == ["a", "b", "c", "a"]


def _stats(running: int, hits: int, generated: int) -> EngineStats:
    return EngineStats(num_running=running, num_waiting=0, num_preemptions_total=0, kv_blocks_used=running,
                       kv_blocks_total=10, prompt_tokens_total=0, generation_tokens_total=generated,
                       prefix_cache_hits_total=hits)


def test_replica_metrics_sum_and_survive_a_restart():
    metrics = EngineMetrics()
    book = ReplicaStatsBook(metrics)
    book.update("r1", _stats(2, 10, 100), sent_at=1.0)
    book.update("r2", _stats(1, 5, 50), sent_at=1.0)
    book.update("r1", _stats(9, 99, 999), sent_at=0.5)  # older than what r1 sent last: dropped
    total = book.total()
    assert (total.num_running, total.prefix_cache_hits_total, total.kv_blocks_total) == (3, 15, 20)
    book.retire("r1")  # r1 died; Ray starts r3 with fresh counters
    book.update("r3", _stats(0, 1, 3), sent_at=2.0)
    total = book.total()
    assert (total.num_running, total.prefix_cache_hits_total, total.generation_tokens_total) == (1, 16, 153)
    assert sorted(book.replicas()) == ["r2", "r3"]
    text = metrics.render()[0].decode()
    assert "tokenmill_generation_tokens_total 153.0" in text  # the counter never went back
    assert 'tokenmill_replica_num_requests_running{replica="r2"} 1.0' in text
    assert 'replica="r1"' not in text


def test_serving_without_replicas_never_imports_ray():
    code = ("import sys\n"
            "from tokenmill.cli import build_parser, replica_config_from_args\n"
            "from tokenmill.config import EngineConfig\n"
            "from tokenmill.server.app import create_app\n"
            "assert replica_config_from_args(build_parser().parse_args(['serve'])) is None\n"
            "create_app(EngineConfig())\n"
            "print(sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.')))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize(("argv", "message"), [
    (["--replicas", "0"], "replicas must be >= 1, got 0"),
    (["--threads-per-replica", "2"], "--threads-per-replica needs --replicas N"),
    (["--replicas", "2", "--model", "a", "--model", "b"], "--replicas serves one model; got 2"),
])
def test_bad_replica_flags_are_one_line_errors(argv, message, capsys):
    assert main(["serve", *argv]) == 2
    assert capsys.readouterr().err.strip() == f"tokenmill: error: {message}"


def test_missing_ray_is_a_one_line_error(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # what `import ray` sees where Ray is not installed
    assert main(["serve", "--replicas", "2"]) == 2
    assert capsys.readouterr().err.strip() == "tokenmill: error: --replicas needs Ray Serve: pip install 'tokenmill[ray]'"
