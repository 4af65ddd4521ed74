"""The Llama-family forward over the paged KV cache, against transformers on the same tiny random weights."""

from __future__ import annotations

import pytest
import torch

from tokenmill.config import ModelConfig, model_config_from_hf
from tokenmill.model.attention import AttentionMetadata, KVCache, SeqSlice
from tokenmill.model.llama import LlamaForCausalLM
from tokenmill.model.registry import build_model

transformers = pytest.importorskip("transformers")

VOCAB = 128
BLOCK_SIZE = 4
NUM_BLOCKS = 64
ATOL = 1e-4

CASES = {
    "llama-tied": dict(arch="llama", tie_word_embeddings=True),
    "llama-untied-bias": dict(arch="llama", tie_word_embeddings=False, attention_bias=True),
    "qwen2-bias": dict(arch="qwen2", tie_word_embeddings=False),
    "llama3-rope": dict(arch="llama", tie_word_embeddings=True, rope_theta=500000.0, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16}),
    "linear-rope": dict(arch="llama", tie_word_embeddings=True, rope_scaling={"rope_type": "linear", "factor": 2.0}),
}


def make_hf_model(arch: str = "llama", seed: int = 0, **overrides):
    """A tiny random transformers model (2 layers, hidden 64, 4 heads, 2 kv heads), weights large enough
    that greedy continuations vary, and norms and biases not at their trivial init."""
    cls_cfg = transformers.Qwen2Config if arch == "qwen2" else transformers.LlamaConfig
    shape = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5)
    cfg = cls_cfg(**{**shape, **overrides})
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, 0.3)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def make_ours(hf_model, dtype: torch.dtype = torch.float32) -> tuple[LlamaForCausalLM, ModelConfig]:
    config = model_config_from_hf(hf_model.config.to_dict())
    return build_model(config, dict(hf_model.state_dict()), dtype, torch.device("cpu")), config


def alloc_caches(config: ModelConfig, dtype: torch.dtype = torch.float32) -> list[KVCache]:
    shape = (NUM_BLOCKS * BLOCK_SIZE, config.num_key_value_heads, config.head_dim)
    return [(torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype))
            for _ in range(config.num_hidden_layers)]


class Seq:
    """A sequence living in the paged cache: its tokens, how many are cached, a shuffled block table."""

    def __init__(self, tokens: list[int], blocks: list[int]) -> None:
        self.tokens, self.block_table, self.num_cached = tokens, blocks, 0


def block_tables(n: int, per_seq: int = 12, seed: int = 1) -> list[list[int]]:
    """n disjoint, shuffled (non-contiguous, out-of-order) block tables."""
    perm = torch.randperm(NUM_BLOCKS, generator=torch.Generator().manual_seed(seed)).tolist()
    return [perm[i * per_seq:(i + 1) * per_seq] for i in range(n)]


def run_step(model, caches: list[KVCache], work: list[tuple[Seq, int]]) -> list[torch.Tensor]:
    """One flattened forward over (seq, num_new_tokens) pairs, decodes first; per-seq logits [n_new, V]."""
    ids, pos, slices = [], [], []
    for seq, n in work:
        ids += seq.tokens[seq.num_cached:seq.num_cached + n]
        pos += range(seq.num_cached, seq.num_cached + n)
        slices.append(SeqSlice(seq.block_table, seq.num_cached, n))
    meta = AttentionMetadata.build(slices, BLOCK_SIZE, "cpu")
    with torch.inference_mode():
        hidden = model(torch.tensor(ids), torch.tensor(pos), caches, meta)
        logits = model.compute_logits(hidden)
    out, start = [], 0
    for seq, n in work:
        out.append(logits[start:start + n])
        seq.num_cached += n
        start += n
    return out


def hf_logits(hf_model, tokens: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf_model(torch.tensor([tokens])).logits[0].float()  # [L, V]


def random_tokens(n: int, seed: int) -> list[int]:
    return torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module", params=list(CASES))
def models(request):
    hf = make_hf_model(**CASES[request.param])
    ours, config = make_ours(hf)
    return hf, ours, config


def test_full_prefill_matches_transformers(models):
    hf, ours, config = models
    tokens = random_tokens(23, seed=3)
    seq = Seq(tokens, block_tables(1)[0])
    (logits,) = run_step(ours, alloc_caches(config), [(seq, len(tokens))])
    expected = hf_logits(hf, tokens)
    assert logits.dtype == torch.float32 and logits.shape == (23, VOCAB)
    torch.testing.assert_close(logits[-1], expected[-1], atol=ATOL, rtol=0)
    torch.testing.assert_close(logits, expected, atol=ATOL, rtol=0)


def test_prefix_then_decode_through_paged_cache(models):
    hf, ours, config = models
    tokens = random_tokens(21, seed=4)
    expected = hf_logits(hf, tokens)
    seq = Seq(tokens, block_tables(1, seed=5)[0])
    caches = alloc_caches(config)
    (prefix,) = run_step(ours, caches, [(seq, 6)])
    torch.testing.assert_close(prefix, expected[:6], atol=ATOL, rtol=0)
    for i in range(6, len(tokens)):
        (step,) = run_step(ours, caches, [(seq, 1)])
        torch.testing.assert_close(step[0], expected[i], atol=ATOL, rtol=0, msg=f"position {i}")


def test_mixed_batch_equals_each_sequence_alone(models):
    hf, ours, config = models
    caches = alloc_caches(config)
    tables = block_tables(4, seed=6)
    dec_a, dec_b = Seq(random_tokens(9, 10), tables[0]), Seq(random_tokens(12, 11), tables[1])
    chunked, fresh = Seq(random_tokens(13, 12), tables[2]), Seq(random_tokens(8, 13), tables[3])
    run_step(ours, caches, [(dec_a, 8), (dec_b, 11), (chunked, 6)])  # earlier steps fill the contexts
    got = run_step(ours, caches, [(dec_a, 1), (dec_b, 1), (chunked, 7), (fresh, 8)])
    wanted = [hf_logits(hf, s.tokens)[-n:] for s, n in ((dec_a, 1), (dec_b, 1), (chunked, 7), (fresh, 8))]
    alone = []
    for s, n in ((dec_a, 1), (dec_b, 1), (chunked, 7), (fresh, 8)):
        solo = Seq(s.tokens, block_tables(1, seed=7)[0])
        solo_caches = alloc_caches(config)
        if len(s.tokens) > n:
            run_step(ours, solo_caches, [(solo, len(s.tokens) - n)])
        alone.append(run_step(ours, solo_caches, [(solo, n)])[0])
    for g, w, a in zip(got, wanted, alone, strict=True):
        torch.testing.assert_close(g, w, atol=ATOL, rtol=0)
        torch.testing.assert_close(g, a, atol=ATOL, rtol=0)


def greedy(model, config: ModelConfig, prompt: list[int], max_new_tokens: int) -> list[int]:
    """Prefill then one decode step per token, argmax of compute_logits."""
    seq = Seq(list(prompt), block_tables(1, seed=8)[0])
    caches = alloc_caches(config)
    (logits,) = run_step(model, caches, [(seq, len(prompt))])
    out = []
    for _ in range(max_new_tokens):
        token = int(logits[-1].argmax())
        out.append(token)
        seq.tokens.append(token)
        (logits,) = run_step(model, caches, [(seq, 1)])
    return out


def test_greedy_continuation_matches_generate(models):
    hf, ours, config = models
    prompt = random_tokens(7, seed=9)
    with torch.no_grad():
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False)[0, len(prompt):].tolist()
    assert len(set(ref)) > 3, "the reference continuation should not be degenerate"
    assert greedy(ours, config, prompt, 32) == ref


def test_dynamic_rope_matches_transformers_incremental_decode():
    """Dynamic NTK past max_position_embeddings: equal to transformers decoding with its KV cache."""
    hf = make_hf_model("llama", tie_word_embeddings=True, max_position_embeddings=16,
                       rope_scaling={"rope_type": "dynamic", "factor": 4.0})
    ours, config = make_ours(hf)
    assert ours.max_positions == 64
    tokens = random_tokens(30, seed=14)
    seq, caches = Seq(tokens, block_tables(1, seed=15)[0]), alloc_caches(config)
    run_step(ours, caches, [(seq, 8)])
    with torch.no_grad():
        out = hf(torch.tensor([tokens[:8]]), use_cache=True)
        past = out.past_key_values
        for i in range(8, 30):
            out = hf(torch.tensor([[tokens[i]]]), past_key_values=past, use_cache=True,
                     position_ids=torch.tensor([[i]]), cache_position=torch.tensor([i]))
            past = out.past_key_values
            (ours_step,) = run_step(ours, caches, [(seq, 1)])
            torch.testing.assert_close(ours_step[0], out.logits[0, -1], atol=ATOL, rtol=0, msg=f"position {i}")


def test_bfloat16_close_to_transformers_bfloat16():
    hf = make_hf_model("qwen2", tie_word_embeddings=False).to(torch.bfloat16)
    ours, config = make_ours(hf, torch.bfloat16)
    assert ours.embed_tokens.dtype == torch.bfloat16
    tokens = random_tokens(16, seed=16)
    seq, caches = Seq(tokens, block_tables(1)[0]), alloc_caches(config, torch.bfloat16)
    (logits,) = run_step(ours, caches, [(seq, 16)])
    expected = hf_logits(hf, tokens)
    assert (logits - expected).abs().max() < 0.05 * expected.abs().max()
    assert (logits.argmax(-1) == expected.argmax(-1)).float().mean() > 0.9


def test_fused_projections_are_single_matmuls():
    hf = make_hf_model("qwen2", tie_word_embeddings=False)
    ours, config = make_ours(hf)
    attn = ours.layers[0].self_attn
    q_out = config.num_attention_heads * config.head_dim
    kv_out = config.num_key_value_heads * config.head_dim
    assert attn.qkv_proj.weight.shape == (q_out + 2 * kv_out, config.hidden_size)
    assert attn.qkv_proj.bias.shape == (q_out + 2 * kv_out,)
    assert ours.layers[0].mlp.gate_up.weight.shape == (2 * config.intermediate_size, config.hidden_size)
    assert all(p.is_contiguous() for p in ours.parameters())


def test_tied_model_shares_embedding_and_untied_has_lm_head():
    tied, _ = make_ours(make_hf_model(tie_word_embeddings=True))
    untied, _ = make_ours(make_hf_model(tie_word_embeddings=False))
    assert tied.lm_head is None
    assert untied.lm_head is not None
    assert not torch.equal(untied.lm_head.weight, untied.embed_tokens)


def test_bad_checkpoints_raise_value_error():
    hf = make_hf_model(tie_word_embeddings=False)
    config = model_config_from_hf(hf.config.to_dict())
    tensors = dict(hf.state_dict())
    missing = {k: v for k, v in tensors.items() if k != "model.layers.1.mlp.up_proj.weight"}
    with pytest.raises(ValueError, match="model.layers.1.mlp.up_proj.weight"):
        build_model(config, missing, torch.float32, torch.device("cpu"))
    with pytest.raises(ValueError, match="lm_head.weight"):
        build_model(config, {k: v for k, v in tensors.items() if k != "lm_head.weight"},
                    torch.float32, torch.device("cpu"))
    with pytest.raises(ValueError, match="does not use"):
        build_model(config, {**tensors, "model.layers.2.mlp.up_proj.weight": tensors["lm_head.weight"]},
                    torch.float32, torch.device("cpu"))
    with pytest.raises(ValueError, match="unsupported weight type"):
        build_model(config, {**tensors, "lm_head.weight": tensors["lm_head.weight"].to(torch.int8)},
                    torch.float32, torch.device("cpu"))
    bad_arch = ModelConfig(**{**config.__dict__, "architecture": "gpt2"})
    with pytest.raises(ValueError, match="unsupported architecture"):
        build_model(bad_arch, tensors, torch.float32, torch.device("cpu"))
    bad_rope = ModelConfig(**{**config.__dict__, "rope_scaling": {"rope_type": "nope", "factor": 2.0}})
    with pytest.raises(ValueError, match="rope_type"):
        build_model(bad_rope, tensors, torch.float32, torch.device("cpu"))


def test_wrong_number_of_kv_caches_raises():
    ours, config = make_ours(make_hf_model())
    meta = AttentionMetadata.build([SeqSlice([0], 0, 2)], BLOCK_SIZE, "cpu")
    with pytest.raises(ValueError, match="kv_caches"):
        ours(torch.tensor([1, 2]), torch.tensor([0, 1]), alloc_caches(config)[:1], meta)
