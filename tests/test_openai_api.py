"""The OpenAI-compatible HTTP API through Serve's HTTP proxy, called with the real `openai` package: the same
tokens as gRPC Generate, logprobs equal to Forward's logits, seeded `n`, the checkpoint's chat template
against transformers' rendering, errors with OpenAI's shape and status, and many streams at once.

The model is the `tiny` preset, written as a checkpoint with a BPE tokenizer (512 tokens, the preset's
vocabulary) and a DeepSeek-style chat template."""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor

import grpc
import httpx
import numpy as np
import openai
import pytest
import torch
from ray import serve

from moe_service.client import Client
from moe_service.serving.local import start_service
from tests.support import Pending, eventually
from tests.support.chat import write_chat_checkpoint

pytestmark = pytest.mark.slow

KEY = "test-key"
MODEL = "tiny-chat"
@pytest.fixture(scope="module")
def service(ray_local, tmp_path_factory):
    path = tmp_path_factory.mktemp("chat")
    write_chat_checkpoint(path)
    # kv_capacity_tokens below max_seq_len: a request that can never fit is refused with 400 (waiting can't help)
    cfg = dict(model=str(path), served_model_name=MODEL, workers=2, gateway_num_cpus=0, expert_bind_host="127.0.0.1",
               sd_port=0, rebalance_interval_s=0, api_key=KEY, workloads=["code"],
               scheduler={"max_running": 16, "max_seq_len": 512, "kv_capacity_tokens": 480})
    svc = start_service(cfg)
    yield svc, path
    svc.shutdown()


@pytest.fixture(scope="module")
def api(service):
    svc, _ = service
    with openai.OpenAI(base_url=f"http://127.0.0.1:{svc.http_port}/v1", api_key=KEY, max_retries=0) as c:
        yield c


@pytest.fixture(scope="module")
def grpc_client(service):
    svc, _ = service
    with Client(svc.address, api_key=KEY) as c:
        yield c


PROMPTS = [[1, 40, 77, 300, 12], [1, 9, 9, 9], [1, 500, 4, 260, 100, 101, 102]]


def test_models_and_health(service, api):
    svc, _ = service
    assert [m.id for m in api.models.list().data] == [MODEL]
    r = httpx.get(f"http://127.0.0.1:{svc.http_port}/health")
    assert r.status_code == 200 and r.json() == {"status": "ok"}


@pytest.mark.parametrize("stream", [False, True])
def test_greedy_completions_are_the_tokens_grpc_generates(service, api, grpc_client, stream):
    for prompt in PROMPTS:
        want = list(grpc_client.generate(token_ids=prompt, max_new_tokens=12, ignore_eos=True))
        want_ids = [t.token_id for t in want if t.token_id >= 0]
        kw = dict(model=MODEL, prompt=prompt, max_tokens=12, temperature=0, logprobs=0,
                  extra_body={"ignore_eos": True})
        if stream:
            chunks = list(api.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
            text = "".join(c.choices[0].text for c in chunks if c.choices)
            tokens = [t for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.tokens]
            assert chunks[-1].usage.prompt_tokens == len(prompt) and chunks[-1].usage.completion_tokens == 12
            reason = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        else:
            r = api.completions.create(**kw)
            text, tokens, reason = r.choices[0].text, r.choices[0].logprobs.tokens, [r.choices[0].finish_reason]
            assert r.usage.prompt_tokens == len(prompt) and r.usage.completion_tokens == 12
        assert text == "".join(t.text for t in want)
        assert len(tokens) == 12 and tokens == [token_text(service, i) for i in want_ids]
        assert reason == ["length"]


def token_text(service, token_id: int) -> str:
    """A token's text as the HTTP API writes it in logprobs: the tokenizer's decoding of that one id."""
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(service[1] / "tokenizer.json")).decode([token_id])


def test_logprobs_are_forwards_log_softmax(service, api, grpc_client):
    prompt = PROMPTS[0]
    # a seeded request samples the same tokens over either API
    ids = grpc_client.generate_ids(prompt, max_new_tokens=8, temperature=0.8, seed=5, ignore_eos=True)
    r = api.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0.8, seed=5, logprobs=3,
                               extra_body={"ignore_eos": True})
    lp = r.choices[0].logprobs
    assert lp.tokens == [token_text(service, i) for i in ids]
    logits = grpc_client.forward([prompt + ids[:-1]])[0]
    want = torch.tensor(logits).log_softmax(-1).numpy()  # [T, V]: before temperature, as documented
    for i, tok in enumerate(ids):
        row = want[len(prompt) - 1 + i]
        assert abs(lp.token_logprobs[i] - row[tok]) <= 1e-4
        # keyed by text, as OpenAI's are: two tokens with one text (partial UTF-8) share an entry
        top3 = np.sort(row)[::-1][:3]
        assert max(lp.top_logprobs[i].values()) == pytest.approx(top3[0], abs=1e-4)
        assert all(np.abs(top3 - v).min() <= 1e-4 for v in lp.top_logprobs[i].values())


def test_chat_logprobs_come_with_bytes_and_alternatives(api, grpc_client):
    r = api.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hello"}], max_tokens=5,
                                    temperature=0, logprobs=True, top_logprobs=2)
    content = r.choices[0].logprobs.content
    assert len(content) == 5
    for c in content:
        assert len(c.top_logprobs) == 2 and c.top_logprobs[0].logprob >= c.top_logprobs[1].logprob
        assert math.isclose(c.logprob, c.top_logprobs[0].logprob, abs_tol=1e-6)  # greedy: the best one
        if "\ufffd" not in c.token:  # a token that is part of a character has bytes but no text of its own
            assert bytes(c.bytes) == c.token.encode()


def test_n_with_a_seed_is_repeatable_and_each_choice_is_its_own_seed(api, grpc_client):
    kw = dict(model=MODEL, prompt=PROMPTS[1], max_tokens=10, temperature=1.0, n=3, seed=11,
              extra_body={"ignore_eos": True})
    a, b = api.completions.create(**kw), api.completions.create(**kw)
    texts = [c.text for c in sorted(a.choices, key=lambda c: c.index)]
    assert texts == [c.text for c in sorted(b.choices, key=lambda c: c.index)]
    assert len(set(texts)) > 1, "three samples at temperature 1 came out identical"
    # the rule: choice i samples as a single request with seed + i
    for i, text in enumerate(texts):
        single = api.completions.create(**{**kw, "n": 1, "seed": 11 + i})
        assert single.choices[0].text == text
    assert a.usage.completion_tokens == 30


def test_chat_uses_the_checkpoints_template_as_transformers_renders_it(service, api, grpc_client):
    from transformers import AutoTokenizer

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "def f(x):"},
                {"role": "assistant", "content": "return x"}, {"role": "user", "content": "again"}]
    hf = AutoTokenizer.from_pretrained(str(service[1]))
    ids = hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert ids[0] == 1  # the template writes BOS
    want = list(grpc_client.generate(token_ids=ids, max_new_tokens=10, ignore_eos=True))
    r = api.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0,
                                    extra_body={"ignore_eos": True})
    assert r.usage.prompt_tokens == len(ids)
    assert r.choices[0].message.content == "".join(t.text for t in want)
    assert r.choices[0].message.role == "assistant" and r.choices[0].finish_reason == "length"
    chunks = list(api.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0,
                                              stream=True, extra_body={"ignore_eos": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == r.choices[0].message.content


def test_stop_strings_end_the_text_before_them(api):
    full = api.completions.create(model=MODEL, prompt="x = ", max_tokens=30, temperature=0,
                                  extra_body={"ignore_eos": True}).choices[0].text
    cut = next(i for i in range(3, len(full)) if full[i - 2 : i].strip())  # a stop string from the middle
    stop = full[cut - 2 : cut]
    for stream in (False, True):
        if stream:
            chunks = list(api.completions.create(model=MODEL, prompt="x = ", max_tokens=30, temperature=0, stop=stop,
                                                 stream=True, extra_body={"ignore_eos": True}))
            text = "".join(c.choices[0].text for c in chunks)
            reason = chunks[-1].choices[0].finish_reason
        else:
            c = api.completions.create(model=MODEL, prompt="x = ", max_tokens=30, temperature=0, stop=[stop],
                                       extra_body={"ignore_eos": True}).choices[0]
            text, reason = c.text, c.finish_reason
        assert text == full[: full.index(stop)] and reason == "stop"


def error_of(call) -> tuple[int, dict]:
    with pytest.raises(openai.APIStatusError) as e:
        call()
    return e.value.status_code, e.value.body


def test_bad_requests_get_openai_errors_and_the_service_keeps_serving(service, api):
    svc, _ = service
    base = dict(model=MODEL, prompt=[1, 5, 6], max_tokens=4)
    status, body = error_of(lambda: api.completions.create(**base, extra_body={"tools": [{"type": "function"}]}))
    assert status == 400 and body["param"] == "tools" and "not supported" in body["message"]
    status, body = error_of(lambda: api.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}],
                                                                response_format={"type": "json_object"}))
    assert status == 400 and body["param"] == "response_format"
    status, body = error_of(lambda: api.completions.create(**{**base, "temperature": -1}))
    assert status == 400 and body["param"] == "temperature" and body["type"] == "invalid_request_error"
    status, body = error_of(lambda: api.completions.create(**{**base, "prompt": [1, 99999]}))
    assert status == 400 and "token id 99999" in body["message"]
    status, body = error_of(lambda: api.completions.create(**{**base, "model": "gpt-4"}))
    assert status == 404 and body["code"] == "model_not_found"
    status, body = error_of(lambda: api.completions.create(**{**base, "max_tokens": 490}))  # more than the KV cache
    assert status == 400 and body["type"] == "invalid_request_error" and "KV cache holds at most 480" in body["message"]
    with openai.OpenAI(base_url=f"http://127.0.0.1:{svc.http_port}/v1", api_key="wrong", max_retries=0) as bad:
        status, body = error_of(lambda: bad.completions.create(**base))
        assert status == 401 and body["code"] == "invalid_api_key"
    raw = httpx.post(f"http://127.0.0.1:{svc.http_port}/v1/completions", content=b"{not json",
                     headers={"authorization": f"Bearer {KEY}", "content-type": "application/json"})
    assert raw.status_code == 400 and set(raw.json()["error"]) == {"message", "type", "param", "code"}
    # an unknown field is ignored: the same answer as without it
    greedy = dict(base, temperature=0)
    plain = api.completions.create(**greedy).choices[0]
    ignored = api.completions.create(**greedy, extra_body={"no_such_field": 1}).choices[0]
    assert (ignored.text, ignored.finish_reason) == (plain.text, plain.finish_reason)
    assert api.completions.create(**base).usage.completion_tokens >= 1


def test_a_client_that_goes_away_cancels_its_request(service):
    svc, _ = service
    body = {"model": MODEL, "prompt": [1, 2, 3], "max_tokens": 400, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", f"http://127.0.0.1:{svc.http_port}/v1/completions", json=body,
                      headers={"authorization": f"Bearer {KEY}"}, timeout=60) as r:
        assert r.status_code == 200
        next(r.iter_lines())
    handle = serve.get_app_handle("moe")
    eventually(lambda: handle.debug_state.remote().result()["running"] == 0, 30, interval=0.1,
               what="no request running after its client went away")


def test_32_http_and_32_grpc_streams_equal_the_same_requests_one_by_one(service, api, grpc_client):
    svc, _ = service
    g = torch.Generator().manual_seed(3)
    prompts = [[1] + torch.randint(3, 512, (int(n),), generator=g).tolist() for n in torch.randint(2, 20, (32,), generator=g)]

    def http(p):
        chunks = api.completions.create(model=MODEL, prompt=p, max_tokens=8, temperature=0, stream=True,
                                        extra_body={"ignore_eos": True})
        return "".join(c.choices[0].text for c in chunks)

    def rpc(p):
        with Client(svc.address, api_key=KEY) as c:
            return "".join(t.text for t in c.generate(token_ids=p, max_new_tokens=8, ignore_eos=True))

    alone = [rpc(p) for p in prompts]
    with ThreadPoolExecutor(64) as pool:
        h = [pool.submit(http, p) for p in prompts]
        r = [pool.submit(rpc, p) for p in prompts]
        assert [f.result() for f in h] == alone
        assert [f.result() for f in r] == alone


def test_grpc_generate_carries_logprobs_n_and_the_request_id(grpc_client):
    toks = list(grpc_client.generate(token_ids=PROMPTS[0], max_new_tokens=4, temperature=1.0, seed=3, n=2,
                                     logprobs=2, request_id="abc-1", ignore_eos=True))
    assert {t.request_id for t in toks} == {"abc-1"}
    for i in range(2):
        mine = [t for t in toks if t.index == i]
        assert [t.finish_reason for t in mine][-1] == "length" and len(mine) == 5
        assert all(t.logprob <= 0 and len(t.top_logprobs) == 2 for t in mine[:-1])
        single = grpc_client.generate_ids(PROMPTS[0], max_new_tokens=4, temperature=1.0, seed=3 + i, ignore_eos=True)
        assert [t.token_id for t in mine[:-1]] == single


def test_routing_is_counted_per_workload_class(service, api, grpc_client):
    """x-moe-workload over gRPC metadata and the HTTP header: a listed class by name, anything else as other."""
    import ray
    from prometheus_client.parser import text_string_to_metric_families

    svc, _ = service
    ids = grpc_client.generate_ids(PROMPTS[0], max_new_tokens=6, ignore_eos=True, workload="code")
    api.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=3, temperature=0,
                           extra_body={"ignore_eos": True}, extra_headers={"x-moe-workload": "chat"})
    sd = ray.get(svc.controller().http_address.remote())
    gateway = next(t for t in httpx.get(f"http://{sd}/targets").json() if t["labels"].get("component") == "gateway")
    want = {"code": len(PROMPTS[0]) + len(ids) - 1, "other": len(PROMPTS[1]) + 3 - 1}  # tokens through a layer
    k = 4  # the tiny preset's experts per token
    def counted():  # the gateway flushes its counts every load_report_interval_s
        text = httpx.get(f"http://{gateway['targets'][0]}/metrics").text
        got: dict[tuple[str, str], float] = {}
        for fam in text_string_to_metric_families(text):
            if fam.name == "moe_routed_tokens_by_workload":
                for s in fam.samples:
                    if s.name.endswith("_total"):
                        key = (s.labels["layer"], s.labels["workload"])
                        got[key] = got.get(key, 0) + s.value
        # only this test tags "code": its count is exact; "other" also holds the module's untagged requests
        if got.get(("1", "code")) == want["code"] * k and got.get(("1", "other"), 0) >= want["other"] * k:
            return got
        return Pending((got, want))

    got = eventually(counted, 30, interval=0.2, what="the routed tokens counted per workload")
    assert {w for _, w in got} <= {"code", "other"}


def test_a_shared_system_prompt_is_reported_as_cached_tokens(api, grpc_client):
    """The second chat with the same system prompt finds it in the gateway's prefix cache: usage says how many
    prompt tokens came from the cache (OpenAI's prompt_tokens_details.cached_tokens), in whole blocks; gRPC's
    usage says the same for token ids (tests/test_scheduler.py shows the outputs do not change)."""
    system = {"role": "system", "content": "You answer in Python. " + "def helper(x): return x * 2\n" * 6}
    chat = lambda q: api.chat.completions.create(  # noqa: E731
        model=MODEL, messages=[system, {"role": "user", "content": q}], max_tokens=6, temperature=0)
    first, second = chat("first question"), chat("second question")
    assert first.usage.prompt_tokens > 64
    hit = second.usage.prompt_tokens_details.cached_tokens
    assert hit >= 48 and hit % 16 == 0 and hit < second.usage.prompt_tokens, second.usage
    ids = [1, 40, 77, 300, 12] * 16  # 80 tokens: four full blocks may be reused, the last token never
    for want in (0, 64):
        last = [t for t in grpc_client.generate(token_ids=ids, max_new_tokens=2, temperature=0) if t.finish_reason][-1]
        assert last.usage["cached_tokens"] == want


def test_draining_answers_503(service, api, grpc_client):
    svc, _ = service
    import ray

    ray.get(svc.controller().drain.remote())
    # the gateway learns of the drain from its next table
    eventually(lambda: httpx.get(f"http://127.0.0.1:{svc.http_port}/health").status_code == 503, 30, interval=0.1,
               what="/health answering 503 once draining")
    status, body = error_of(lambda: api.completions.create(model=MODEL, prompt=[1, 4], max_tokens=2))
    assert status == 503 and body["type"] == "service_unavailable_error"
    with pytest.raises(grpc.RpcError) as e:
        grpc_client.generate_ids([1, 4], max_new_tokens=2)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE
