"""BlockManager: allocation, fork, copy-on-write, reference counts, exhaustion."""

import pytest
import torch

from tokenmill.config import ModelConfig
from tokenmill.engine.kv_cache import BlockCopy, BlockManager, KVCacheTensors, NoFreeBlocks
from tokenmill.engine.request import Sequence


def seq(n_tokens: int, seq_id: int = 0) -> Sequence:
    return Sequence(seq_id, list(range(n_tokens)), n_tokens)


def test_allocate_rounds_up_to_blocks_and_free_returns_them():
    bm = BlockManager(num_blocks=8, block_size=4)
    s = seq(9)
    assert bm.allocate(s, 9) == []
    assert len(s.block_table) == 3 and bm.num_free_blocks == 5
    s.num_computed_tokens = 9
    bm.allocate(s, 12)  # fits in the third block
    assert len(s.block_table) == 3
    bm.allocate(s, 13)
    assert len(s.block_table) == 4
    bm.free(s)
    assert s.block_table == [] and bm.num_free_blocks == 8


def test_exhaustion_raises_and_changes_nothing():
    bm = BlockManager(num_blocks=2, block_size=4)
    s = seq(12)
    with pytest.raises(NoFreeBlocks):
        bm.allocate(s, 12)
    assert s.block_table == [] and bm.num_free_blocks == 2


def test_fork_shares_blocks_and_copy_on_write_on_partial_last_block():
    bm = BlockManager(num_blocks=8, block_size=4)
    parent = seq(6)
    bm.allocate(parent, 6)
    parent.num_computed_tokens = 6
    child = seq(6, seq_id=1)
    child.num_computed_tokens = 6
    bm.fork(parent, child)
    assert child.block_table == parent.block_table
    assert all(bm.ref_count(b) == 2 for b in parent.block_table)
    assert bm.num_used_blocks == 2
    # the child writes token 6 into the shared partial block 1: it gets a private copy
    copies = bm.allocate(child, 7)
    assert copies == [BlockCopy(parent.block_table[1], child.block_table[1])]
    assert child.block_table[0] == parent.block_table[0]  # full block still shared
    assert bm.ref_count(parent.block_table[1]) == 1 and bm.ref_count(child.block_table[1]) == 1
    # the parent is now the only owner of its block: it writes in place
    assert bm.allocate(parent, 7) == []
    bm.free(parent)
    assert bm.ref_count(child.block_table[0]) == 1
    bm.free(child)
    assert bm.num_free_blocks == 8


def test_copy_on_write_counts_in_needed_blocks():
    bm = BlockManager(num_blocks=3, block_size=4)
    parent = seq(6)
    bm.allocate(parent, 6)
    parent.num_computed_tokens = 6
    child = seq(6, seq_id=1)
    child.num_computed_tokens = 6
    bm.fork(parent, child)
    assert bm.num_new_blocks(child, 7) == 1  # the copy
    assert bm.num_new_blocks(child, 9) == 2  # the copy and a new block
    with pytest.raises(NoFreeBlocks):
        bm.allocate(child, 9)


def test_kv_tensors_copy_blocks():
    cfg = ModelConfig("llama", 10, 8, 16, 2, 2, 1, 4)
    cache = KVCacheTensors(cfg, num_blocks=3, block_size=2, dtype=torch.float32, device=torch.device("cpu"))
    k, v = cache.layers[1]
    k[0:2] = 1.0
    v[0:2] = 2.0
    cache.copy_blocks([BlockCopy(0, 2)])
    assert torch.equal(k[4:6], k[0:2]) and torch.equal(v[4:6], v[0:2])
    assert k[2:4].abs().sum() == 0
