"""A DeepSeek-V3 checkpoint in FP8 blocks, served (2 workers, replicated experts): logits within 1e-3 of
transformers on the dequantized weights, 32 greedy tokens identical, the workers' experts really FP8, and
the same tokens through a live rebalance that moves FP8 replicas (onto a third worker and between the two)."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import ray
import torch

from moe_service import Client
from moe_service.serving.local import start_service
from tests.fp8_checkpoint import write_fp8_checkpoint
from tests.test_fp8 import FP8_CONFIG

pytestmark = pytest.mark.slow
RELATIVE = 1e-3


@pytest.fixture(scope="module")
def service(ray_local, tmp_path_factory):
    path = tmp_path_factory.mktemp("fp8_served")
    oracle = write_fp8_checkpoint(path, FP8_CONFIG)
    svc = start_service(dict(model=str(path / "fp8"), workers=2, redundant_experts=4, gpus_per_worker=1.0,
                             gateway_num_cpus=0, expert_bind_host="127.0.0.1", sd_port=0, rebalance_interval_s=0,
                             rebalance_min_gain=0.0, scheduler={"max_running": 8, "max_seq_len": 128}))
    yield svc, oracle
    svc.shutdown()


def greedy(oracle, prompt: list[int], n: int = 32) -> list[int]:
    with torch.no_grad():
        return oracle.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, eos_token_id=None,
                               pad_token_id=0)[0, len(prompt):].tolist()


def test_served_fp8_v3_equals_transformers_on_the_dequantized_weights(service):
    svc, oracle = service
    pings = svc.worker_pings()
    assert [p["expert_dtypes"] for p in pings] == [["torch.float8_e4m3fn"]] * 2, "the experts were dequantized"
    table = ray.get(svc.controller().table.remote())
    assert any(len(reps) > 1 for r in table["routes"].values() for reps in r["replicas"]), "nothing replicated"
    g = torch.Generator().manual_seed(3)
    batch = [torch.randint(3, 101, (n,), generator=g).tolist() for n in (11, 4)]
    with Client(svc.address) as client:
        logits = client.forward(batch)
        for b, seq in enumerate(batch):
            with torch.no_grad():
                want = oracle(torch.tensor([seq])).logits[0].numpy()
            got = logits[b, : len(seq)]
            assert np.abs(got - want).max() <= RELATIVE * np.abs(want).max()
        assert client.generate_ids(batch[0], max_new_tokens=32, ignore_eos=True) == greedy(oracle, batch[0])


def test_tokens_are_the_same_through_a_live_rebalance_that_moves_fp8_replicas(service):
    svc, oracle = service
    prompt = [1, 17, 44, 9, 60]
    want = greedy(oracle, prompt, 48)
    ctl = svc.controller()
    got: list[int] = []
    first_token = threading.Event()

    def stream() -> None:
        with Client(svc.address) as client:
            for tok in client.generate(token_ids=prompt, max_new_tokens=48, ignore_eos=True):
                if tok.token_id >= 0:
                    got.append(tok.token_id)
                    first_token.set()

    t = threading.Thread(target=stream)
    t.start()
    assert first_token.wait(60)
    # a third worker mid-stream: replicas move onto it (read as FP8) and between the others (copied)
    result = ray.get(ctl.rebalance.remote(force=True, num_workers=3))
    t.join(120)
    assert result["applied"], result
    pings = svc.worker_pings()
    after = {p["worker_id"]: set(map(tuple, p["hosted"])) for p in pings}
    assert len(after) == 3 and after[2], "no replica moved to the new worker"
    routes = ray.get(ctl.table.remote())["routes"]
    assert any(2 in reps for r in routes.values() for reps in r["replicas"]), "the new worker's replicas are not routed"
    assert [p["expert_dtypes"] for p in pings] == [["torch.float8_e4m3fn"]] * 3
    assert got == want
