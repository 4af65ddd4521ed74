"""The server as the real clients use it: openai, litellm, LangChain, huggingface_hub, text-generation,
and lm-evaluation-harness (``local-completions``, the scoring path: echo + logprobs), plus vLLM's extra
routes and shapes, and a table of every optional field sent as ``null``.

One server for the module: a tiny random Llama (the default model's tokenizer, a chat template that
reads ``enable_thinking`` like Qwen3's) served as "tiny" with the alias "tiny-alias". The heavy client
imports (litellm, lm-eval) happen inside their tests.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch

from tests.server.conftest import RunningServer, serve_in_thread, wait_until_ready
from tokenmill.config import EngineConfig
from tokenmill.server.app import create_app
from tokenmill.server.protocol import ChatCompletionRequest, CompletionRequest

openai = pytest.importorskip("openai")

pytestmark = pytest.mark.usefixtures("one_thread")

TEMPLATE = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% if enable_thinking is defined and not enable_thinking %}{{ '<think>\n\n</think>\n\n' }}{% endif %}"
    "{% endif %}")
MESSAGES = [{"role": "user", "content": "Hello there"}]
DATA = Path(__file__).parent.parent / "data"


@pytest.fixture(scope="module")
def model_dir(tiny_hf_model, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-chat")
    shutil.copytree(tiny_hf_model("llama"), folder, dirs_exist_ok=True)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": TEMPLATE}))
    return folder


@pytest.fixture(scope="module")
def tiny(model_dir) -> Iterator[RunningServer]:
    # 32-token chunks: a long prompt's logprobs come from several prefill steps
    config = EngineConfig(model=str(model_dir), max_model_len=512, max_num_seqs=8, kv_cache_memory_gb=0.05,
                          max_num_batched_tokens=32, seed=0, dtype="float32", quantization="none")
    running = wait_until_ready(serve_in_thread(create_app(config, served_model_names=["tiny", "tiny-alias"])))
    yield running
    running.stop()


@pytest.fixture(scope="module")
def client(tiny) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{tiny.url}/v1", api_key="x", max_retries=0)


def _post(tiny: RunningServer, path: str, body: dict) -> httpx.Response:
    return httpx.post(f"{tiny.url}{path}", json=body, timeout=120)


def _sse_events(response: httpx.Response) -> list[dict]:
    return [json.loads(line[6:]) for line in response.text.splitlines()
            if line.startswith("data: ") and line != "data: [DONE]"]


# -- chat streaming: one entry per index per event --------------------------------------------------

def test_chat_stream_events_carry_one_entry_per_index_and_the_last_one_its_finish_reason(tiny):
    r = _post(tiny, "/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 5, "stream": True, "n": 2,
                                             "temperature": 1.0, "seed": 3})
    events = _sse_events(r)
    for event in events:
        indexes = [c["index"] for c in event["choices"]]
        assert len(indexes) == len(set(indexes)), event
    finishes = {c["index"]: c["finish_reason"] for e in events for c in e["choices"] if c["finish_reason"]}
    assert finishes == {0: "length", 1: "length"}


def test_litellm_stream_and_non_stream(tiny):
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no download of the price list
    litellm = pytest.importorskip("litellm")
    common = dict(model="openai/tiny", api_base=f"{tiny.url}/v1", api_key="x", messages=MESSAGES, max_tokens=4,
                  temperature=0)
    response = litellm.completion(**common)
    assert response.choices[0].finish_reason == "length" and response.usage.completion_tokens == 4
    chunks = list(litellm.completion(**common, stream=True))  # fails on a stream without finish_reason
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == response.choices[0].message.content


def test_langchain_stream_metadata_has_finish_reason_and_model_name(tiny):
    langchain_openai = pytest.importorskip("langchain_openai")
    llm = langchain_openai.ChatOpenAI(base_url=f"{tiny.url}/v1", api_key="x", model="tiny", max_tokens=4,
                                      temperature=0)
    merged = None
    for chunk in llm.stream("Hello there"):
        merged = chunk if merged is None else merged + chunk
    assert merged.response_metadata["finish_reason"] == "length"
    assert merged.response_metadata["model_name"] == "tiny"
    assert merged.content == llm.invoke("Hello there").content


# -- model names ------------------------------------------------------------------------------------

def test_openai_models_retrieve_by_name_and_alias(client):
    assert client.models.retrieve("tiny").id == "tiny"
    assert client.models.retrieve("tiny-alias").id == "tiny"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")
    r = client.chat.completions.create(model="tiny-alias", messages=MESSAGES, max_tokens=2)
    assert r.model == "tiny"


def test_huggingface_hub_inference_client(tiny, monkeypatch):
    from huggingface_hub import InferenceClient, constants
    from huggingface_hub.utils import reset_sessions

    # Offline mode (set by CI's environment or another test) must not block loopback. huggingface_hub caches
    # its HTTP session with the offline adapter mounted, so drop the cached sessions on the way in and out.
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    reset_sessions()
    try:
        hf = InferenceClient(base_url=tiny.url)
        chat = hf.chat_completion(MESSAGES, max_tokens=3)  # sends the placeholder model name "dummy"
        assert chat.choices[0].finish_reason == "length" and chat.model == "tiny"
        text = hf.text_generation("Hello there", max_new_tokens=3, details=True)
        assert text.details.generated_tokens == 3 and text.generated_text
    finally:
        monkeypatch.undo()
        reset_sessions()


def test_text_generation_client_chat_sends_nulls_and_tgi_name(tiny):
    text_generation = pytest.importorskip("text_generation")
    response = text_generation.Client(tiny.url).chat(messages=[text_generation.types.Message(**MESSAGES[0])],
                                                    max_tokens=3)
    assert response.choices[0].finish_reason == "length"
    r = _post(tiny, "/v1/chat/completions", {"model": "tgi", "messages": MESSAGES, "max_tokens": 2})
    assert r.status_code == 200 and r.json()["model"] == "tiny"


# -- explicit nulls ---------------------------------------------------------------------------------

def _optional_fields(model) -> list[str]:
    return [name for name, f in model.model_fields.items() if not f.is_required()]


@pytest.mark.parametrize(("path", "base", "field"),
                         [("/v1/completions", {"prompt": "Hello", "max_tokens": 2}, f)
                          for f in _optional_fields(CompletionRequest)]
                         + [("/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 2}, f)
                            for f in _optional_fields(ChatCompletionRequest)])
def test_every_optional_field_sent_as_null_is_accepted(tiny, path, base, field):
    body = {**base, field: None}
    if field == "max_tokens" and "messages" in base:
        body["max_completion_tokens"] = 2  # keep the answer short: chat's default is no limit
    r = _post(tiny, path, body)
    assert r.status_code == 200, r.text


def test_errors_name_the_field_at_fault(tiny):
    for field, value in (("stream", "yes"), ("n", "2"), ("stop", [1]), ("presence_penalty", 5)):
        r = _post(tiny, "/v1/chat/completions", {"messages": MESSAGES, field: value})
        assert r.status_code == 400 and r.json()["error"]["param"] in (field, f"{field}[0]"), r.text


# -- vLLM's routes and fields ----------------------------------------------------------------------

def test_tokenize_detokenize_and_version(tiny):
    tokenizer = tiny.engine.info.tokenizer
    by_prompt = _post(tiny, "/tokenize", {"prompt": "Hello world", "return_token_strs": True}).json()
    assert by_prompt["tokens"] == tokenizer.encode("Hello world") and by_prompt["count"] == len(by_prompt["tokens"])
    assert by_prompt["max_model_len"] == 512 and len(by_prompt["token_strs"]) == by_prompt["count"]
    tgi = _post(tiny, "/tokenize", {"inputs": "Hello world"}).json()
    assert [t["id"] for t in tgi] == by_prompt["tokens"]
    by_messages = _post(tiny, "/tokenize", {"messages": MESSAGES}).json()
    assert by_messages["tokens"] == tokenizer.apply_chat_template(MESSAGES, tokenize=True)
    assert _post(tiny, "/detokenize", {"tokens": by_messages["tokens"]}).json()["prompt"] == \
        "<|im_start|>user\nHello there<|im_end|>\n<|im_start|>assistant\n"
    assert _post(tiny, "/tokenize", {"prompt": "a", "inputs": "b"}).status_code == 400
    assert _post(tiny, "/detokenize", {"tokens": [10**9]}).json()["error"]["param"] == "tokens"
    import tokenmill
    assert httpx.get(f"{tiny.url}/version").json() == {"version": tokenmill.__version__}


def test_chat_template_kwargs_reach_the_template(tiny, client):
    plain = _post(tiny, "/tokenize", {"messages": MESSAGES}).json()["count"]
    thinking_off = _post(tiny, "/tokenize", {"messages": MESSAGES,
                                             "chat_template_kwargs": {"enable_thinking": False}}).json()["count"]
    assert thinking_off > plain
    r = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=2,
                                       extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    assert r.usage.prompt_tokens == thinking_off
    bad = _post(tiny, "/v1/chat/completions", {"messages": MESSAGES, "chat_template_kwargs": {"messages": []}})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "chat_template_kwargs"


def _reference_logprobs(model_dir: Path, ids: list[int]) -> torch.Tensor:
    """transformers' log-probability of each prompt token after the first."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()
    return logits[:-1].log_softmax(-1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]


def test_echo_with_logprobs_scores_the_prompt_like_transformers(tiny, client, model_dir):
    """Across prefill chunks, and although the prompt's blocks are in the prefix cache."""
    ids = tiny.engine.info.tokenizer.encode("The quick brown fox jumps over the lazy dog. " * 8)
    assert len(ids) > 64
    client.completions.create(model="tiny", prompt=ids, max_tokens=1)  # fills the prefix cache
    r = client.completions.create(model="tiny", prompt=ids, echo=True, logprobs=2, max_tokens=0)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(ids) and lp.token_logprobs[0] is None and r.usage.completion_tokens == 0
    assert r.choices[0].text == tiny.engine.info.tokenizer.decode(ids)
    expected = _reference_logprobs(model_dir, ids)
    assert torch.allclose(torch.tensor(lp.token_logprobs[1:]), expected, atol=1e-3)  # float32, other kernels
    assert all(len(top) <= 2 for top in lp.top_logprobs[1:])
    one = client.completions.create(model="tiny", prompt=ids, echo=True, logprobs=1, max_tokens=1)
    assert len(one.choices[0].logprobs.tokens) == len(ids) + 1
    chat = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=1,
                                          extra_body={"prompt_logprobs": 1})
    prompt_logprobs = chat.model_extra["prompt_logprobs"]
    assert prompt_logprobs[0] is None and len(prompt_logprobs) == chat.usage.prompt_tokens


def test_logprob_bytes_are_the_tokens_own_bytes(tiny, client):
    tokenizer = tiny.engine.info.tokenizer
    pieces = tokenizer.encode("😀")
    assert len(pieces) > 1  # byte-level pieces: each decodes to U+FFFD alone
    got = b""
    for token_id in pieces:
        r = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=1, temperature=0,
                                           logprobs=True, logit_bias={str(token_id): 100})
        got += bytes(r.choices[0].logprobs.content[0].bytes)
    assert got.decode() == "😀"


def test_metrics_under_vllm_names(tiny, client):
    client.completions.create(model="tiny", prompt="Hello", max_tokens=3)
    metrics = tiny.metrics()
    assert metrics["vllm:time_to_first_token_seconds_count"] >= 1
    assert metrics["vllm:e2e_request_latency_seconds_count"] == metrics["tokenmill_e2e_request_latency_seconds_count"]
    assert metrics['vllm:request_success_total{finished_reason="length"}'] >= 1
    assert metrics["vllm:prompt_tokens_total"] == metrics["tokenmill_prompt_tokens_total"] > 0
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc"):
        assert name in metrics


# -- an evaluation harness as a client ---------------------------------------------------------------

def test_lm_eval_local_completions_matches_its_hf_backend(tiny, model_dir, tmp_path, monkeypatch):
    """lm-eval scores a local multiple-choice task through the server (echo + logprobs) and with
    transformers in process; the accuracies and every choice's loglikelihood agree."""
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(var, "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    lm_eval = pytest.importorskip("lm_eval")
    yaml = pytest.importorskip("yaml")
    task = yaml.safe_load((DATA / "lm_eval" / "tiny_mc.yaml").read_text())
    task["dataset_kwargs"] = {"data_files": {"test": str(DATA / "lm_eval" / "tiny_mc.jsonl")}}
    from lm_eval.tasks import TaskManager

    tasks = TaskManager(include_defaults=False)  # not the index of lm-eval's own tasks

    def evaluate(model: str, model_args: str) -> tuple[float, list[float]]:
        results = lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=[task], task_manager=tasks,
                                          batch_size=16, log_samples=True, bootstrap_iters=0)
        samples = sorted(results["samples"][task["task"]], key=lambda s: s["doc_id"])
        return results["results"][task["task"]]["acc,none"], [r[0] for s in samples for r in s["filtered_resps"]]

    served_acc, served = evaluate("local-completions", f"model=tiny,base_url={tiny.url}/v1/completions,"
                                  f"tokenizer={model_dir},tokenizer_backend=huggingface,num_concurrent=1,"
                                  "max_retries=1,tokenized_requests=True")
    hf_acc, reference = evaluate("hf", f"pretrained={model_dir},dtype=float32,device=cpu")
    assert len(served) == len(reference) >= 40
    assert abs(served_acc - hf_acc) <= 0.01
    assert served == pytest.approx(reference, abs=1e-3)
