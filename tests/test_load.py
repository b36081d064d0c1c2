"""Many clients at once against the local service (loopback only, bounded): continuous batching,
API-key authentication, and a return to idle afterwards."""

from __future__ import annotations

import threading

import grpc
import pytest
import torch
from ray import serve

from moe_service import load_model
from moe_service.client import Client
from moe_service.engine.engine import Engine
from moe_service.engine.sampling import SamplingParams
from moe_service.serving.local import start_service

pytestmark = pytest.mark.slow
KEY = "test-key-123"
CLIENTS = 32


@pytest.fixture(scope="module")
def service(ray_local):
    cfg = dict(model="tiny", workers=2, gpus_per_worker=1.0, gateway_num_cpus=0, expert_bind_host="127.0.0.1",
               sd_port=0, rebalance_interval_s=0, api_key=KEY,
               scheduler={"max_running": 16, "max_seq_len": 512, "max_queue": 64, "prefill_chunk": 64,
                          "step_token_budget": 128})
    svc = start_service(cfg)
    yield svc
    svc.shutdown()


def requests() -> list[tuple[list[int], SamplingParams]]:
    g = torch.Generator().manual_seed(5)
    out = []
    for i in range(CLIENTS):
        n = [3, 9, 40, 120, 17, 64, 5, 200][i % 8]
        prompt = [1] + torch.randint(3, 512, (n,), generator=g).tolist()
        if i % 2:
            params = SamplingParams(max_new_tokens=16, temperature=0.8, top_p=0.95, seed=1000 + i, ignore_eos=True)
        else:
            params = SamplingParams(max_new_tokens=16, ignore_eos=True)
        out.append((prompt, params))
    return out


def test_api_key_is_required(service):
    with Client(service.address) as anon:
        with pytest.raises(grpc.RpcError) as err:
            list(anon.generate(token_ids=[1, 5, 6], max_new_tokens=2))
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "authorization: Bearer" in err.value.details()
        with pytest.raises(grpc.RpcError) as err:
            anon.model_info()
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert anon.health() == "SERVING"  # probes need no key
    with Client(service.address, api_key="wrong") as bad:
        with pytest.raises(grpc.RpcError) as err:
            bad.forward([[1, 2]])
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with Client(service.address, api_key=KEY) as ok:
        assert len(ok.generate_ids([1, 5, 6], max_new_tokens=2)) == 2


def test_32_concurrent_streams_equal_one_by_one_and_return_to_idle(service):
    reqs = requests()
    engine = Engine(load_model("tiny"))
    want = [engine.generate([p], params)[0].output for p, params in reqs]
    handle = serve.get_app_handle("moe")
    with Client(service.address, api_key=KEY) as c:
        c.generate_ids([1, 2, 3], max_new_tokens=4)  # warm-up: first-use allocations are not a leak
    idle = handle.debug_state.remote().result()
    results: list = [None] * CLIENTS
    errors: list = []
    barrier = threading.Barrier(CLIENTS)

    def run(i: int) -> None:
        prompt, params = reqs[i]
        try:
            with Client(service.address, api_key=KEY) as c:
                barrier.wait(30)
                toks = list(c.generate(token_ids=prompt, params=params, timeout_s=300))
            results[i] = toks
        except Exception as e:  # every failure is reported below
            errors.append((i, repr(e)))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors, errors[:3]
    for i, toks in enumerate(results):
        assert toks[-1].finish_reason == "length"
        assert [t.token_id for t in toks[:-1]] == want[i], f"request {i} differs from its one-by-one run"
        assert toks[-1].usage["generated_tokens"] == 16
    after = handle.debug_state.remote().result()
    assert after["running"] == 0 and after["waiting"] == 0
    assert after["kv_blocks_used"] == 0 and after["kv_used_tokens"] == 0  # kept prefix blocks are not used KV
    assert after["pid"] == idle["pid"]
    assert after["rss_bytes"] < idle["rss_bytes"] + 64 * 2**20, (idle["rss_bytes"], after["rss_bytes"])
