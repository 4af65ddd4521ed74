"""Scheduler: token budget, chunked prefill, sequence cap, FCFS, preemption, prefix reuse, and the
step contract (schedule -> a runner's output -> update_from_output), driven by a fake runner (model-free)."""

from tokenmill.engine.kv_cache_manager import KVCacheManager
from tokenmill.engine.request import Request, RequestStatus
from tokenmill.engine.scheduler import Scheduler
from tokenmill.engine.step import ModelRunnerOutput, SampledTokens, SchedulerOutput
from tokenmill.sampling_params import SamplingParams

EOS = 0


def make_request(rid: str, n_prompt: int, start: int = 1, **params) -> Request:
    return Request(rid, list(range(start, start + n_prompt)), SamplingParams(**{"max_tokens": 8, **params}))


def make_scheduler(num_blocks: int = 64, block_size: int = 4, max_num_seqs: int = 8,
                   max_num_batched_tokens: int = 100, prefix_caching: bool = True) -> Scheduler:
    kv = KVCacheManager(num_blocks, block_size, prefix_caching)
    return Scheduler(kv, max_num_seqs, max_num_batched_tokens, eos_token_ids=[EOS], max_model_len=1024)


class FakeRunner:
    """Returns fixed tokens for every sampled sequence: ``tokens`` (at most len(drafts) + 1 of them,
    the accepted run) for a sequence fed drafts, else one ``token`` per sample."""

    def __init__(self, token: int = 7, tokens: list[int] | None = None) -> None:
        self.token, self.tokens = token, tokens

    def execute(self, plan: SchedulerOutput) -> ModelRunnerOutput:
        out = ModelRunnerOutput()
        for s in plan.scheduled:
            if not s.samples:
                continue
            if s.draft_token_ids:
                ids = self.tokens[:len(s.draft_token_ids) + 1]
                out.sampled[s.seq.seq_id] = [SampledTokens(ids, [-0.5] * len(ids))]
            else:
                out.sampled[s.seq.seq_id] = [SampledTokens([self.token], [-0.5]) for _ in range(s.num_samples)]
        return out


def run_step(sched: Scheduler, runner: FakeRunner | None = None):
    plan = sched.schedule()
    outputs = sched.update_from_output(plan, (runner or FakeRunner()).execute(plan))
    return plan, outputs


def test_long_prompt_is_prefilled_in_chunks_under_the_budget():
    sched = make_scheduler(max_num_batched_tokens=10)
    r = make_request("a", 25)
    sched.add_request(r)
    sizes = []
    for _ in range(3):
        plan, _ = run_step(sched)
        sizes.append([s.num_new_tokens for s in plan.scheduled])
    assert sizes == [[10], [10], [5]]
    assert r.seqs[0].num_output_tokens == 1  # sampled once, after the last chunk
    assert [s.num_new_tokens for s in run_step(sched)[0].scheduled] == [1]  # now decoding


def test_decodes_come_first_and_prefill_fills_the_rest_of_the_budget():
    sched = make_scheduler(max_num_batched_tokens=8)
    a, b = make_request("a", 3), make_request("b", 20, start=100)
    sched.add_request(a)
    run_step(sched)  # a prefilled
    sched.add_request(b)
    plan, _ = run_step(sched)
    assert [(s.request.request_id, s.num_new_tokens) for s in plan.scheduled] == [("a", 1), ("b", 7)]


def test_sequence_cap_and_fcfs():
    sched = make_scheduler(max_num_seqs=2)
    reqs = [make_request(str(i), 3, start=10 * i + 1) for i in range(3)]
    for r in reqs:
        sched.add_request(r)
    plan, _ = run_step(sched)
    assert [s.request.request_id for s in plan.scheduled] == ["0", "1"]
    assert reqs[2].status is RequestStatus.WAITING


def test_preemption_frees_the_newest_request_and_recomputes_it_later():
    sched = make_scheduler(num_blocks=4, prefix_caching=False)  # 16 token slots
    kv = sched.kv
    a, b = make_request("a", 8), make_request("b", 8, start=50)
    sched.add_request(a)
    sched.add_request(b)
    run_step(sched)  # both prefilled: 2 blocks each, cache full
    assert kv.num_free_blocks == 0
    plan, _ = run_step(sched)  # a writes its 9th token: a 3rd block -> b is preempted
    assert plan.preempted == [b]
    assert b.status is RequestStatus.WAITING and b.seqs[0].num_computed_tokens == 0
    assert [s.request.request_id for s in plan.scheduled] == ["a"]
    assert b.seqs[0].num_output_tokens == 1  # its generated token is kept and recomputed
    sched.abort_request("a")
    plan, _ = run_step(sched)
    assert plan.scheduled[0].request is b and plan.scheduled[0].num_new_tokens == 9
    sched.abort_request("b")
    assert kv.num_free_blocks == 4


def test_second_request_with_a_shared_prefix_prefills_only_its_new_tokens():
    sched = make_scheduler(block_size=4)
    first = Request("a", list(range(1, 15)), SamplingParams(max_tokens=1))  # 3 full blocks + 2
    sched.add_request(first)
    plan, outputs = run_step(sched)
    assert plan.num_tokens == 14 and outputs[0].finished and outputs[0].num_cached_tokens == 0
    second = Request("b", list(range(1, 13)) + [40, 41, 42], SamplingParams(max_tokens=1))
    sched.add_request(second)
    plan, outputs = run_step(sched)
    assert plan.num_tokens == 3  # 12 cached tokens, 3 new
    assert outputs[0].num_cached_tokens == 12
    assert (sched.counters.prefix_cache_queries, sched.counters.prefix_cache_hits) == (14 + 15, 12)
    kv = sched.kv
    assert kv.num_used_blocks == 0 and kv.num_free_blocks + kv.num_cached_free_blocks == kv.num_blocks


def test_prompt_logprobs_requests_do_not_read_the_cache():
    sched = make_scheduler()
    sched.add_request(Request("a", list(range(1, 15)), SamplingParams(max_tokens=1)))
    run_step(sched)
    r = Request("b", list(range(1, 15)), SamplingParams(max_tokens=1, prompt_logprobs=1))
    r.prompt_logprobs = [None]
    sched.add_request(r)
    plan, _ = run_step(sched)
    assert plan.num_tokens == 14


def test_runner_output_with_two_tokens_for_one_request_appends_both_and_truncates_kv():
    """A decode fed 1 + 3 draft tokens gets 2 tokens back (1 draft accepted + 1): the KV of the two
    rejected drafts is dropped and the next step feeds exactly one token."""
    sched = make_scheduler(block_size=4)
    r = make_request("a", 6, max_tokens=20)
    sched.add_request(r)
    run_step(sched, FakeRunner(token=11))  # prefill; first token 11
    seq = r.seqs[0]
    assert seq.token_ids[-1] == 11 and seq.num_computed_tokens == 6
    seq.draft_token_ids = [12, 13, 14]
    plan, outputs = run_step(sched, FakeRunner(tokens=[12, 30]))  # draft 12 accepted, then 30 instead of 13
    (s,) = plan.scheduled
    assert s.num_new_tokens == 4 and s.input_token_ids() == [11, 12, 13, 14] and s.num_logit_rows == 4
    assert seq.output_token_ids == [11, 12, 30]
    assert outputs[0].seqs[0].new_token_ids == [12, 30]
    assert seq.num_computed_tokens == 8  # prompt + 11 + 12; 30 is fed next
    assert len(sched.kv.block_table(seq)) == 2  # the third block, taken for the drafts, was given back
    assert sched.kv.num_used_blocks == 2
    plan, _ = run_step(sched)
    assert plan.scheduled[0].num_new_tokens == 1 and plan.scheduled[0].start == 8


def test_stop_in_the_middle_of_accepted_tokens_ends_the_sequence_there():
    sched = make_scheduler()
    r = make_request("a", 6, max_tokens=20)
    sched.add_request(r)
    run_step(sched, FakeRunner(token=11))
    r.seqs[0].draft_token_ids = [12, 13]
    _, outputs = run_step(sched, FakeRunner(tokens=[12, EOS, 99]))
    assert r.seqs[0].output_token_ids == [11, 12, EOS]
    assert outputs[0].finished and outputs[0].seqs[0].finish_reason.value == "stop"
    assert sched.kv.num_used_blocks == 0


def test_n_samples_fan_out_from_one_row_and_share_the_prompt_blocks():
    sched = make_scheduler(block_size=4)
    r = make_request("a", 9, n=3)
    r.sample_generators = [None, None, None]
    sched.add_request(r)
    plan, outputs = run_step(sched)
    assert plan.scheduled[0].num_samples == 3
    assert [s.index for s in r.seqs] == [0, 1, 2]
    assert [d.index for d in outputs[0].seqs] == [0, 1, 2]
    tables = [sched.kv.block_table(s) for s in r.seqs]
    assert tables[0] == tables[1] == tables[2]
    assert sched.kv.ref_count(tables[0][0]) == 3


def test_stop_sequence_from_the_api_side_frees_the_blocks_at_once():
    sched = make_scheduler()
    r = make_request("a", 6, max_tokens=20)
    sched.add_request(r)
    run_step(sched)
    assert sched.kv.num_used_blocks > 0
    sched.stop_sequence("a", 0, "stop here")
    assert sched.kv.num_used_blocks == 0 and r.is_finished and not sched.has_unfinished()
    assert r.seqs[0].stop_reason == "stop here"
