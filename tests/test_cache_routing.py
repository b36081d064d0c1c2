"""Cache-aware routing across two gateway replicas (serving/gateway/router.py), through the real fronts: Serve's
gRPC proxy (token ids and text) and the HTTP front's handle (chat, the template applied).

Each of 12 distinct prompts is sent twice, one after the other. The second finds the first's blocks only if
it goes to the same replica: with Serve's default router that is a coin toss per prompt (about 1 in 4,000
for all 12), with the cache-aware router every time, since it remembers where it sent the first."""

from __future__ import annotations

import openai
import pytest

from moe_service.client import Client
from moe_service.serving.local import start_service
from tests.support.chat import write_chat_checkpoint

pytestmark = pytest.mark.slow

MODEL = "tiny-chat"


@pytest.fixture(scope="module")
def service(ray_local, tmp_path_factory):
    path = tmp_path_factory.mktemp("chat")
    write_chat_checkpoint(path)
    cfg = dict(model=str(path), served_model_name=MODEL, workers=1, gateway_replicas=2, gateway_num_cpus=0,
               expert_bind_host="127.0.0.1", sd_port=0, rebalance_interval_s=0,
               scheduler={"max_running": 8, "max_seq_len": 512})
    svc = start_service(cfg)
    yield svc
    svc.shutdown()


def cached(usage: dict) -> int:
    return usage["cached_tokens"]


def test_a_repeated_prompt_goes_to_the_replica_holding_its_prefix(service):
    with Client(service.address) as c:
        def last(**kw):
            return [t for t in c.generate(max_new_tokens=2, temperature=0, **kw) if t.finish_reason][-1].usage

        for i in range(4):  # token ids
            ids = [1] + [(7 * i + j) % 500 + 3 for j in range(80)]
            assert cached(last(token_ids=ids)) == 0
            assert cached(last(token_ids=ids)) == 80, i
        for i in range(4):  # text, which the router tokenizes as the gateway does
            text = f"Question {i}: " + "def helper(x): return x * 2\n" * 8
            assert cached(last(prompt=text)) == 0
            assert cached(last(prompt=text)) >= 48, i


def test_a_chat_with_a_known_system_prompt_goes_where_it_is_cached(service):
    with openai.OpenAI(base_url=f"http://127.0.0.1:{service.http_port}/v1", api_key="none", max_retries=0) as api:
        for i in range(4):
            system = {"role": "system", "content": f"You are assistant {i}. " + "def helper(x): return x * 2\n" * 6}
            chat = lambda q: api.chat.completions.create(  # noqa: E731
                model=MODEL, messages=[system, {"role": "user", "content": q}], max_tokens=2, temperature=0)
            first, second = chat("first question"), chat("second question")
            assert not first.usage.prompt_tokens_details.cached_tokens
            assert second.usage.prompt_tokens_details.cached_tokens >= 48, (i, second.usage)
