"""Scheduler: token budget, chunked prefill, sequence cap, FCFS, preemption (model-free)."""

from tokenmill.engine.kv_cache import BlockManager
from tokenmill.engine.request import Request, RequestStatus, Sequence
from tokenmill.engine.scheduler import Scheduler
from tokenmill.sampling_params import SamplingParams


def make_request(rid: str, n_prompt: int) -> Request:
    r = Request(rid, list(range(n_prompt)), SamplingParams(max_tokens=8))
    r.seqs.append(Sequence(hash(rid) % 1000, list(range(n_prompt)), n_prompt))
    return r


def run_step(sched: Scheduler, sampled_token: int = 7):
    """Apply a plan as the engine would: mark tokens computed and append a token where sampled."""
    plan = sched.schedule()
    for s in plan.scheduled:
        samples = s.samples
        s.seq.num_computed_tokens += s.num_new_tokens
        if samples:
            s.seq.token_ids.append(sampled_token)
    return plan


def test_long_prompt_is_prefilled_in_chunks_under_the_budget():
    sched = Scheduler(BlockManager(64, 4), max_num_seqs=8, max_num_batched_tokens=10)
    r = make_request("a", 25)
    sched.add(r)
    sizes = []
    for _ in range(3):
        plan = run_step(sched)
        sizes.append([s.num_new_tokens for s in plan.scheduled])
    assert sizes == [[10], [10], [5]]
    assert r.seqs[0].num_output_tokens == 1  # sampled once, after the last chunk
    assert [s.num_new_tokens for s in run_step(sched).scheduled] == [1]  # now decoding


def test_decodes_come_first_and_prefill_fills_the_rest_of_the_budget():
    sched = Scheduler(BlockManager(64, 4), max_num_seqs=8, max_num_batched_tokens=8)
    a, b = make_request("a", 3), make_request("b", 20)
    sched.add(a)
    run_step(sched)  # a prefilled
    sched.add(b)
    plan = run_step(sched)
    assert [(s.request.request_id, s.num_new_tokens) for s in plan.scheduled] == [("a", 1), ("b", 7)]


def test_sequence_cap_and_fcfs():
    sched = Scheduler(BlockManager(64, 4), max_num_seqs=2, max_num_batched_tokens=100)
    reqs = [make_request(str(i), 3) for i in range(3)]
    for r in reqs:
        sched.add(r)
    plan = run_step(sched)
    assert [s.request.request_id for s in plan.scheduled] == ["0", "1"]
    assert reqs[2].status is RequestStatus.WAITING


def test_preemption_frees_the_newest_request_and_recomputes_it_later():
    bm = BlockManager(4, 4)  # 16 token slots
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=100)
    a, b = make_request("a", 8), make_request("b", 8)
    sched.add(a)
    sched.add(b)
    run_step(sched)  # both prefilled: 2 blocks each, cache full
    assert bm.num_free_blocks == 0
    plan = run_step(sched)  # a writes its 9th token: a 3rd block -> b is preempted
    assert plan.preempted == [b]
    assert b.status is RequestStatus.WAITING and b.seqs[0].num_computed_tokens == 0
    assert [s.request.request_id for s in plan.scheduled] == ["a"]
    assert b.seqs[0].num_output_tokens == 1  # its generated token is kept and recomputed
    sched.finish(a)
    plan = run_step(sched)
    assert plan.scheduled[0].request is b and plan.scheduled[0].num_new_tokens == 9
    sched.finish(b)
    assert bm.num_free_blocks == 4
