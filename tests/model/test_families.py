"""Qwen3, Mistral (sliding window), Phi-3 (fused checkpoint weights) and Gemma 3 on tiny random transformers
models: logits within 1e-4 of transformers, through prefill chunks and decodes in the paged cache."""

from __future__ import annotations

import pytest
import torch

from tests.model.test_llama import (
    BLOCK_SIZE,
    VOCAB,
    Seq,
    alloc_caches,
    block_tables,
    hf_logits,
    random_tokens,
    run_step,
)
from tokenmill.config import model_config_from_hf
from tokenmill.model.registry import build_model, model_class

transformers = pytest.importorskip("transformers")

ATOL = 1e-4
WINDOW = 6  # tokens a sliding layer sees; the prompts below are longer, so the window matters
SHAPE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5)
CASES = {
    "qwen3": ("Qwen3Config", dict(head_dim=16)),
    "qwen3-window": ("Qwen3Config", dict(head_dim=16, use_sliding_window=True, sliding_window=WINDOW,
                                         max_window_layers=1)),
    "mistral-window": ("MistralConfig", dict(sliding_window=WINDOW)),
    "phi3": ("Phi3Config", dict(pad_token_id=0)),
    "phi3-window": ("Phi3Config", dict(pad_token_id=0, sliding_window=WINDOW)),
    "gemma3": ("Gemma3TextConfig", dict(head_dim=16, num_hidden_layers=3, sliding_window=WINDOW,
                                        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                                        query_pre_attn_scalar=24, rope_local_base_freq=100.0)),
}


def make_hf(name: str):
    cls_name, extra = CASES[name]
    cfg = getattr(transformers, cls_name)(**{**SHAPE, **extra})
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "norm" in pname:
                p.uniform_(0.5, 1.5) if "gemma" not in name else p.uniform_(-0.5, 0.5)
            else:
                p.normal_(0.0, 0.3)
    return model


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module", params=list(CASES))
def models(request):
    hf = make_hf(request.param)
    config = model_config_from_hf(hf.config.to_dict())
    ours = build_model(config, dict(hf.state_dict()), torch.float32, torch.device("cpu"))
    return request.param, hf, ours, config


def test_config_is_parsed_by_the_family_class(models):
    name, _, ours, config = models
    assert type(ours) is model_class(config.architecture)
    assert config.architecture == name.split("-")[0]
    windows = [config.layer_window(i) for i in range(config.num_hidden_layers)]
    expected = {"qwen3": [None, None], "qwen3-window": [None, WINDOW], "mistral-window": [WINDOW, WINDOW],
                "phi3": [None, None], "phi3-window": [WINDOW, WINDOW], "gemma3": [WINDOW, None, WINDOW]}
    assert windows == expected[name]


def test_chunked_prefill_then_decode_matches_transformers(models):
    """A 9-token chunk, a 5-token chunk (gathering its context, past the window), then decodes one by one."""
    _, hf, ours, config = models
    tokens = random_tokens(22, seed=7)
    expected = hf_logits(hf, tokens)
    seq = Seq(tokens, block_tables(1, seed=3)[0])
    caches = alloc_caches(config)
    (first,) = run_step(ours, caches, [(seq, 9)])
    (second,) = run_step(ours, caches, [(seq, 5)])
    torch.testing.assert_close(torch.cat([first, second]), expected[:14], atol=ATOL, rtol=0)
    for i in range(14, len(tokens)):
        (step,) = run_step(ours, caches, [(seq, 1)])
        torch.testing.assert_close(step[0], expected[i], atol=ATOL, rtol=0)


def test_mixed_batch_of_decodes_and_prefill_matches_transformers(models):
    """Two sequences decoding past the window while a third prefills in the same step."""
    _, hf, ours, config = models
    caches = alloc_caches(config)
    tables = block_tables(3, per_seq=8, seed=11)
    seqs = [Seq(random_tokens(n, seed=20 + n), t) for n, t in zip((16, 12, 10), tables)]
    run_step(ours, caches, [(seqs[0], 13), (seqs[1], 9)])
    logits = run_step(ours, caches, [(seqs[0], 1), (seqs[1], 1), (seqs[2], 10)])
    torch.testing.assert_close(logits[0][0], hf_logits(hf, seqs[0].tokens[:14])[-1], atol=ATOL, rtol=0)
    torch.testing.assert_close(logits[1][0], hf_logits(hf, seqs[1].tokens[:10])[-1], atol=ATOL, rtol=0)
    torch.testing.assert_close(logits[2], hf_logits(hf, seqs[2].tokens), atol=ATOL, rtol=0)


def test_missing_family_tensor_names_it():
    hf = make_hf("phi3")
    config = model_config_from_hf(hf.config.to_dict())
    tensors = {k: v for k, v in hf.state_dict().items() if k != "model.layers.1.self_attn.qkv_proj.weight"}
    with pytest.raises(ValueError, match="qkv_proj"):
        build_model(config, tensors, torch.float32, torch.device("cpu"))


def test_unsupported_phi3_longrope_raises():
    cfg = {"architectures": ["Phi3ForCausalLM"], **SHAPE,
           "rope_scaling": {"type": "longrope", "short_factor": [1.0], "long_factor": [1.0]}}
    with pytest.raises(ValueError, match="longrope"):
        model_config_from_hf(cfg)


def test_block_size_is_what_the_tests_assume():
    assert BLOCK_SIZE == 4  # the windows above span several blocks, and a chunk starts mid-block
