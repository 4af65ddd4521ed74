"""Structured outputs: grammars enforced token by token (JSON schema, regex, choice), with n > 1, seeds,
batching beside unconstrained requests, speculative decoding and preemption; bad grammars rejected."""

import json
import re

import jsonschema
import pytest
import torch

from tokenmill import LLM, SamplingParams, StructuredOutputsParams
from tokenmill.engine.sampler import apply_grammar_mask
from tokenmill.engine.structured_output import GrammarCompiler
from tokenmill.sampling_params import SamplingParamsError

SCHEMAS = {
    "nested": {"type": "object", "additionalProperties": False, "required": ["person"], "properties": {
        "person": {"type": "object", "additionalProperties": False, "required": ["name", "address"], "properties": {
            "name": {"type": "string", "maxLength": 12},
            "address": {"type": "object", "additionalProperties": False, "required": ["city", "zip"],
                        "properties": {"city": {"type": "string", "maxLength": 12},
                                       "zip": {"type": "string", "pattern": "^[0-9]{5}$"}}}}}}},
    "array": {"type": "object", "additionalProperties": False, "required": ["tags"], "properties": {
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "minItems": 1, "maxItems": 4}}},
    "enum": {"type": "object", "additionalProperties": False, "required": ["color", "size"], "properties": {
        "color": {"enum": ["red", "green", "blue"]}, "size": {"type": "string", "enum": ["S", "M", "L"]}}},
    "bounds": {"type": "object", "additionalProperties": False, "required": ["age", "level"], "properties": {
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "level": {"type": "integer", "minimum": -5, "maximum": 5}}},
    "required": {"type": "object", "additionalProperties": False, "required": ["id", "name", "active"],
                 "properties": {"id": {"type": "integer", "minimum": 1, "maximum": 999},
                                "name": {"type": "string", "maxLength": 10}, "active": {"type": "boolean"},
                                "note": {"type": "string", "maxLength": 10}}},
}
PROMPTS = ["Give me a JSON record.", "Describe a user as JSON.", "Answer in JSON only.",
           "Return data as a JSON object.", "Output JSON for an item."]


@pytest.fixture(scope="module")
def llm():
    # float32 weights: the int4 kernels round activations to bf16, so a batch's composition can move a
    # sampled token of an unconstrained request now and then (tests/server/conftest.py says more)
    return LLM(dtype="float32", quantization="none", kv_cache_memory_gb=0.1, kv_cache_dtype="float32")


@pytest.fixture(scope="module")
def tiny_path(tiny_hf_model):
    return str(tiny_hf_model())


@pytest.fixture(scope="module")
def tiny_llm(tiny_path):
    return LLM(tiny_path, max_model_len=512, max_num_seqs=128)


def chat_ids(llm: LLM, text: str) -> list[int]:
    return llm.get_tokenizer().apply_chat_template([{"role": "user", "content": text}], tokenize=True)


def test_200_sampled_json_documents_parse_and_validate(tiny_llm):
    # a random 2-layer model at temperature 1: every bit of structure comes from the grammar
    prompts, params = [], []
    for s, schema in enumerate(SCHEMAS.values()):
        for p in range(5):
            prompts.append([5 + s, 17 + p, 101, 9])
            params.append(SamplingParams(n=8, temperature=1.0, seed=100 * s + p, max_tokens=400,
                                         structured_outputs=StructuredOutputsParams(json=schema)))
    outs = tiny_llm.generate(prompts, params, use_tqdm=False)
    docs = [(c, schema) for o, schema in zip(outs, [x for x in SCHEMAS.values() for _ in range(5)]) for c in o.outputs]
    assert len(docs) == 200
    for c, schema in docs:
        assert c.finish_reason == "stop", c.text
        jsonschema.validate(json.loads(c.text), schema)
    assert len({c.text for c, _ in docs}) > 150  # sampled, not one forced answer


def test_regex_and_choice(llm):
    date = StructuredOutputsParams(regex=r"(19|20)\d{2}-(0[1-9]|1[0-2])-(0[1-9]|[12]\d|3[01])")
    outs = llm.generate(["The date today is"] * 4, SamplingParams(n=4, temperature=1.0, seed=3, max_tokens=20,
                                                                  structured_outputs=date), use_tqdm=False)
    for c in (c for o in outs for c in o.outputs):
        assert re.fullmatch(date.regex, c.text), c.text
        assert c.finish_reason == "stop"
    choices = ["positive", "negative", "neutral sentiment"]
    outs = llm.generate(["I love it. Sentiment:"], SamplingParams(n=16, temperature=1.0, seed=5, max_tokens=10,
                                                                  structured_outputs={"choice": choices}),
                        use_tqdm=False)
    assert all(c.text in choices for c in outs[0].outputs)


def test_length_cut_leaves_an_unfinished_document(llm):
    out = llm.generate(["JSON:"], SamplingParams(temperature=0, max_tokens=3, structured_outputs={
        "json": SCHEMAS["nested"]}), use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "length"
    assert out.text.startswith('{"person"')
    with pytest.raises(json.JSONDecodeError):
        json.loads(out.text)


def test_unconstrained_requests_in_a_mixed_batch_get_the_same_tokens_as_alone(llm):
    free = [SamplingParams(temperature=1.0, seed=i, max_tokens=12) for i in range(3)]
    prompts = [chat_ids(llm, t) for t in PROMPTS[:3]]
    alone = [llm.generate([p], params, use_tqdm=False)[0].outputs[0].token_ids for p, params in zip(prompts, free)]
    constrained = [SamplingParams(temperature=1.0, seed=9, max_tokens=12,
                                  structured_outputs={"json": SCHEMAS["enum"]})] * 3
    mixed = llm.generate(prompts + prompts, free + constrained, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in mixed[:3]] == alone
    assert all(json.loads(o.outputs[0].text)["color"] in ("red", "green", "blue") for o in mixed[3:])


def test_a_seeded_constrained_request_gives_the_same_document_in_any_batch(llm):
    params = SamplingParams(temperature=1.0, seed=11, max_tokens=60, structured_outputs={"json": SCHEMAS["array"]})
    prompt = chat_ids(llm, PROMPTS[0])
    alone = llm.generate([prompt], params, use_tqdm=False)[0].outputs[0].text
    others = SamplingParams(temperature=1.0, max_tokens=20, structured_outputs={"json": SCHEMAS["bounds"]})
    batched = llm.generate([chat_ids(llm, PROMPTS[1]), prompt, chat_ids(llm, PROMPTS[2])], [others, params, others],
                           use_tqdm=False)[1].outputs[0].text
    assert batched == alone




def test_speculative_decoding_and_preemption_keep_the_grammar_in_step(tiny_path):
    # a random tiny model: without the grammar it would never write JSON; the n-gram drafts it
    # proposes are checked against the grammar, and the matcher is rolled back after each step
    params = SamplingParams(temperature=0, max_tokens=60, structured_outputs={"json": SCHEMAS["required"]})
    prompts = [[5 + i, 9, 17, 5 + i, 9, 17, 5 + i] * 2 for i in range(6)]
    plain_llm = LLM(tiny_path, max_model_len=256)
    plain = plain_llm.generate(prompts, params, use_tqdm=False)
    spec = LLM(tiny_path, max_model_len=256, speculative_config={
        "method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1, "disable_by_batch_size": 16})
    info = plain_llm.engine.info  # 12 blocks: room for two of these 5-block sequences at a time
    small = LLM(tiny_path, max_model_len=256, kv_cache_memory_gb=12 * info.kv_cache_bytes / info.num_blocks / 2**30)
    texts = [o.outputs[0].text for o in plain]
    assert [o.outputs[0].text for o in spec.generate(prompts, params, use_tqdm=False)] == texts
    assert spec.engine.stats().spec_decode_draft_tokens_total > 0
    assert [o.outputs[0].text for o in small.generate(prompts, params, use_tqdm=False)] == texts
    assert small.engine.stats().num_preemptions_total > 0
    for text in texts:
        if text.endswith("}"):
            jsonschema.validate(json.loads(text), SCHEMAS["required"])


@pytest.mark.parametrize("spec, message", [
    ({"json": {"type": "strnig"}}, "strnig"),
    ({"json": {"type": "object", "if": {"type": "object"}}}, "if"),
    ({"json": "{not json"}, "not valid JSON"),
    ({"regex": "a(b"}, "unclosed group"),
    ({"grammar": "start: foo"}, "foo"),
    ({"choice": []}, "choice"),
    ({"regex": "a", "choice": ["a"]}, "exactly one"),
])
def test_bad_grammars_raise_naming_the_problem(llm, spec, message):
    with pytest.raises(SamplingParamsError, match=message) as info:
        llm.generate(["x"], SamplingParams(structured_outputs=spec), use_tqdm=False)
    assert info.value.param == "structured_outputs"
    assert not llm.engine.has_unfinished()


def test_beam_search_with_a_grammar_is_rejected():
    with pytest.raises(SamplingParamsError, match="beam search") as info:
        SamplingParams(num_beams=2, temperature=0, structured_outputs={"regex": "a+"})
    assert info.value.param == "structured_outputs"


def test_the_mask_allows_exactly_the_tokens_of_the_bitmask(llm):
    compiler = GrammarCompiler(llm.get_tokenizer(), 49152, [2])
    grammar = compiler.grammar(StructuredOutputsParams(choice=["yes", "no"]))
    mask = grammar.bitmask([])  # [1, W]
    logits = torch.zeros(2, 49152)
    masked = apply_grammar_mask(logits, torch.tensor([1]), mask)
    allowed = masked[1].isfinite().nonzero().flatten().tolist()
    tokenizer = llm.get_tokenizer()
    assert allowed and all("yes".startswith(t) or "no".startswith(t) for t in tokenizer.token_texts(allowed))
    assert masked[0].isfinite().all()  # rows without a grammar are untouched
    assert compiler.compile(StructuredOutputsParams(choice=["yes", "no"])) is compiler.compile(
        StructuredOutputsParams(choice=["yes", "no"]))  # compiled once, by grammar text
