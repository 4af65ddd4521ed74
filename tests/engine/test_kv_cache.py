"""KVCacheManager: allocation, fork, copy-on-write, truncation, prefix caching and eviction (model-free)."""

import pytest
import torch

from tokenmill.config import ModelConfig
from tokenmill.engine.kv_cache import BlockCopy, KVCacheTensors
from tokenmill.engine.kv_cache_manager import KVCacheManager
from tokenmill.engine.request import Sequence


def seq(n_tokens: int, seq_id: int = 0, start: int = 0) -> Sequence:
    return Sequence(seq_id, list(range(start, start + n_tokens)), n_tokens)


def check_accounting(kv: KVCacheManager) -> None:
    assert kv.num_free_blocks + kv.num_cached_free_blocks + kv.num_used_blocks == kv.num_blocks
    assert kv.num_used_blocks == sum(1 for b in range(kv.num_blocks) if kv.ref_count(b) > 0)
    assert kv.num_shared_blocks == sum(1 for b in range(kv.num_blocks) if kv.ref_count(b) > 1)


def compute(kv: KVCacheManager, s: Sequence, num_new: int, cached: list[int] = ()) -> list[BlockCopy] | None:
    """Allocate and mark computed, as the scheduler does after the forward."""
    copies = kv.allocate_slots(s, num_new, new_computed_blocks=cached)
    if copies is not None:
        s.num_computed_tokens += len(cached) * kv.block_size + num_new
        kv.cache_full_blocks(s)
    return copies


def test_allocate_rounds_up_to_blocks_and_free_returns_them():
    kv = KVCacheManager(num_blocks=8, block_size=4, enable_prefix_caching=False)
    s = seq(9)
    assert kv.allocate_slots(s, 9) == []
    assert len(kv.block_table(s)) == 3 and kv.num_free_blocks == 5
    s.num_computed_tokens = 9
    kv.allocate_slots(s, 3)  # fits in the third block
    assert len(kv.block_table(s)) == 3
    kv.allocate_slots(s, 4)
    assert len(kv.block_table(s)) == 4
    kv.free(s)
    assert kv.block_table(s) == [] and kv.num_free_blocks == 8
    check_accounting(kv)


def test_exhaustion_returns_none_and_changes_nothing():
    kv = KVCacheManager(num_blocks=2, block_size=4)
    s = seq(12)
    assert kv.allocate_slots(s, 12) is None
    assert kv.block_table(s) == [] and kv.num_free_blocks == 2


def test_lookahead_slots_are_reserved():
    kv = KVCacheManager(num_blocks=8, block_size=4)
    s = seq(4)
    kv.allocate_slots(s, 4, num_lookahead_tokens=3)
    assert len(kv.block_table(s)) == 2


def test_fork_shares_blocks_and_copy_on_write_on_partial_last_block():
    kv = KVCacheManager(num_blocks=8, block_size=4)
    parent = seq(6)
    compute(kv, parent, 6)
    child = seq(6, seq_id=1)
    child.num_computed_tokens = 6
    kv.fork(parent, child)
    assert kv.block_table(child) == kv.block_table(parent)
    assert all(kv.ref_count(b) == 2 for b in kv.block_table(parent))
    assert kv.num_used_blocks == 2 and kv.num_shared_blocks == 2
    # the child writes token 6 into the shared partial block 1: it gets a private copy
    copies = kv.allocate_slots(child, 1)
    assert copies == [BlockCopy(kv.block_table(parent)[1], kv.block_table(child)[1])]
    assert kv.block_table(child)[0] == kv.block_table(parent)[0]  # full block still shared
    assert kv.num_shared_blocks == 1
    # the parent is now the only owner of its block: it writes in place
    assert kv.allocate_slots(parent, 1) == []
    kv.free(parent)
    assert kv.ref_count(kv.block_table(child)[0]) == 1 and kv.num_shared_blocks == 0
    kv.free(child)
    assert kv.num_used_blocks == 0
    check_accounting(kv)


def test_copy_on_write_counts_in_needed_blocks():
    kv = KVCacheManager(num_blocks=3, block_size=4)
    parent = seq(6)
    compute(kv, parent, 6)
    child = seq(6, seq_id=1)
    child.num_computed_tokens = 6
    kv.fork(parent, child)
    assert kv.allocate_slots(child, 3) is None  # the copy and a new block: 2 needed, 1 free
    assert kv.allocate_slots(child, 1) is not None


def test_truncate_frees_the_blocks_past_the_kept_tokens():
    kv = KVCacheManager(num_blocks=8, block_size=4)
    s = seq(5)
    kv.allocate_slots(s, 5, num_lookahead_tokens=6)  # 11 slots: 3 blocks
    assert len(kv.block_table(s)) == 3
    kv.truncate(s, 6)
    assert len(kv.block_table(s)) == 2 and kv.num_used_blocks == 2
    kv.truncate(s, 0)
    assert kv.block_table(s) == [] and kv.num_used_blocks == 0
    check_accounting(kv)


def test_truncate_into_a_cached_block_uncaches_it():
    kv = KVCacheManager(num_blocks=8, block_size=4)
    s = seq(9)
    compute(kv, s, 8)  # two full cached blocks
    kv.truncate(s, 6)  # block 1 will be written again
    s.num_computed_tokens = 6
    other = seq(9, seq_id=1)
    blocks, num = kv.get_computed_blocks(other)
    assert num == 4 and blocks == kv.block_table(s)[:1]


def test_prefix_hit_reuses_blocks_and_leaves_the_last_token():
    kv = KVCacheManager(num_blocks=16, block_size=4)
    a = seq(13)
    compute(kv, a, 13)  # 3 full blocks cached
    kv.free(a)
    assert kv.num_cached_free_blocks == 3 and kv.num_used_blocks == 0
    check_accounting(kv)
    b = Sequence(1, list(range(12)) + [99, 98], 14)  # shares the first 12 tokens
    blocks, num = kv.get_computed_blocks(b)
    assert num == 12 and len(blocks) == 3
    compute(kv, b, 2, blocks)
    assert kv.block_table(b)[:3] == blocks and kv.num_cached_free_blocks == 0
    check_accounting(kv)
    exact = seq(12, seq_id=2)  # the whole prompt cached: its last token is still computed
    assert kv.get_computed_blocks(exact)[1] == 8


def test_cache_salt_separates_prefixes():
    kv = KVCacheManager(num_blocks=16, block_size=4)
    a = seq(9)
    kv.allocate_slots(a, 9)
    a.num_computed_tokens = 9
    kv.cache_full_blocks(a, cache_salt="alice")
    assert kv.get_computed_blocks(seq(9, seq_id=1), cache_salt="alice")[1] == 8
    assert kv.get_computed_blocks(seq(9, seq_id=2), cache_salt="bob")[1] == 0
    assert kv.get_computed_blocks(seq(9, seq_id=3))[1] == 0


def test_different_first_block_means_no_hit_even_if_later_blocks_match():
    kv = KVCacheManager(num_blocks=16, block_size=4)
    a = seq(9)
    compute(kv, a, 9)
    b = Sequence(1, [50, 51, 52, 53] + list(range(4, 9)), 9)  # block 1 equal, block 0 not
    assert kv.get_computed_blocks(b)[1] == 0


def test_eviction_is_least_recently_used_and_hits_stay_right():
    kv = KVCacheManager(num_blocks=6, block_size=4)
    prompts = [seq(9, seq_id=i, start=100 * i) for i in range(4)]  # 2 full blocks + 1 partial each
    for p in prompts[:2]:
        compute(kv, p, 9)
        kv.free(p)
    check_accounting(kv)
    assert kv.num_cached_free_blocks == 4 and kv.num_free_blocks == 2
    # a third prompt needs 3 blocks: 2 free + the least recently freed cached one (prompt 0's last)
    compute(kv, prompts[2], 9)
    check_accounting(kv)
    again0 = seq(9, seq_id=10, start=0)
    again1 = seq(9, seq_id=11, start=100)
    assert kv.get_computed_blocks(again0)[1] == 4  # its second block was evicted
    assert kv.get_computed_blocks(again1)[1] == 8  # untouched
    kv.free(prompts[2])
    check_accounting(kv)


def test_many_prefixes_through_a_small_cache_never_leak():
    kv = KVCacheManager(num_blocks=12, block_size=4)
    hits = 0
    for i in range(60):
        s = seq(10, seq_id=i, start=1000 * (i % 5))  # 5 distinct prompts, repeated: 10 of 12 blocks
        blocks, num = kv.get_computed_blocks(s)
        assert compute(kv, s, s.num_tokens - num, blocks) is not None
        hits += num
        kv.free(s)
        check_accounting(kv)
    assert hits > 0 and kv.num_used_blocks == 0


def test_kv_tensors_copy_blocks():
    cfg = ModelConfig("llama", 10, 8, 16, 2, 2, 1, 4)
    cache = KVCacheTensors(cfg, num_blocks=3, block_size=2, dtype=torch.float32, device=torch.device("cpu"))
    k, v = cache.layers[1]
    k[0:2] = 1.0
    v[0:2] = 2.0
    cache.copy_blocks([BlockCopy(0, 2)])
    assert torch.equal(k[4:6], k[0:2]) and torch.equal(v[4:6], v[0:2])
    assert k[2:4].abs().sum() == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int8])
def test_cpu_kv_tensors_start_as_zeros_and_never_share_memory(dtype):
    # the CPU cache is carved out of one anonymous map (committed when written): every tensor of every layer
    # must be zeros at first and have its own bytes
    cfg = ModelConfig("llama", 10, 8, 16, 3, 2, 1, 4)
    cache = KVCacheTensors(cfg, num_blocks=5, block_size=2, dtype=dtype, device=torch.device("cpu"))
    tensors = [t for layer in cache.layers for t in layer]
    assert len(tensors) == 3 * (3 if dtype == torch.int8 else 2)
    assert all(not t.any() for t in tensors)
    for i, t in enumerate(tensors):
        t.fill_(i + 1)
    assert all(bool((t == i + 1).all()) for i, t in enumerate(tensors))
    assert all(t.data_ptr() % 64 == 0 for t in tensors)
