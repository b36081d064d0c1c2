"""The service end to end on a local Ray: Serve gateway + expert worker actors + controller, real gRPC.
The service must not change the model: everything is compared with transformers on the same weights."""

from __future__ import annotations

import threading

import grpc
import numpy as np
import pytest
import torch

from moe_service import Client
from moe_service.serving.local import start_service
from tests.oracle import CONFIGS, write_checkpoint
from tests.support import eventually

pytestmark = pytest.mark.slow
TOL = 1e-4
ORACLE_CONFIG = dict(CONFIGS["qlora_grouped_scaled"], num_hidden_layers=3)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("served")
    hf = write_checkpoint(path, ORACLE_CONFIG)
    return path, hf


def service_config(path, **kw) -> dict:
    base = dict(model=str(path), workers=2, gpus_per_worker=1.0, gateway_num_cpus=0, expert_bind_host="127.0.0.1",
                scheduler={"max_running": 8, "max_seq_len": 256}, expert_call_timeout_s=20.0, sd_port=0,
                rebalance_interval_s=0)
    base.update(kw)
    return base


@pytest.fixture(scope="module")
def batch():
    g = torch.Generator().manual_seed(7)
    return [torch.randint(3, 257, (n,), generator=g).tolist() for n in (13, 5, 21)]


def hf_logits(hf, seqs):
    out = []
    with torch.no_grad():
        for s in seqs:
            out.append(hf(torch.tensor([s])).logits[0].numpy())
    return out


def hf_greedy(hf, prompt, n=32):
    with torch.no_grad():
        return hf.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, eos_token_id=None,
                           pad_token_id=0)[0, len(prompt):].tolist()


def check_equal_to_transformers(client: Client, hf, batch) -> None:
    logits = client.forward(batch)
    assert logits.shape == (3, 21, 257)
    for b, want in enumerate(hf_logits(hf, batch)):
        assert np.abs(logits[b, : len(batch[b])] - want).max() <= TOL
    got = client.generate_ids(batch[0], max_new_tokens=32, ignore_eos=True)
    assert got == hf_greedy(hf, batch[0])


# 3 workers run with replicated experts only: without replicas they are the 1- and 2-worker cases again
@pytest.mark.parametrize("workers,redundant,device", [(1, 0, None), (2, 0, "cpu"), (3, 4, None)])
def test_served_model_equals_transformers(ray_local, checkpoint, batch, workers, redundant, device):
    """`device`: the gateway_device setting, the path a GPU gateway takes, here naming the CPU."""
    path, hf = checkpoint
    svc = start_service(service_config(path, workers=workers, redundant_experts=redundant, gateway_device=device))
    try:
        if redundant:
            table = ray_local.get(svc.controller().table.remote())
            replicated = [e for r in table["routes"].values() for e, reps in enumerate(r["replicas"]) if len(reps) > 1]
            assert replicated, "no expert was replicated"
        with Client(svc.address) as client:
            assert client.health() == "SERVING"
            check_equal_to_transformers(client, hf, batch)
    finally:
        svc.shutdown()


@pytest.fixture(scope="module")
def service(ray_local, checkpoint):
    path, _ = checkpoint
    svc = start_service(service_config(path))
    yield svc
    svc.shutdown()


def test_killing_a_worker_mid_stream_changes_nothing(ray_local, service, checkpoint, batch):
    _, hf = checkpoint
    want = hf_greedy(hf, batch[2], n=48)
    other_want = hf_greedy(hf, batch[1], n=48)
    before = {w["worker_id"]: w for w in ray_local.get(service.controller().worker_info.remote())}
    got, other = [], []
    errors = []

    def concurrent():
        try:
            with Client(service.address) as c:
                other.extend(c.generate_ids(batch[1], max_new_tokens=48, ignore_eos=True))
        except Exception as e:  # reported below
            errors.append(e)

    with Client(service.address) as client:
        stream = client.generate(token_ids=batch[2], max_new_tokens=48, ignore_eos=True)
        for tok in stream:
            if tok.token_id >= 0:
                got.append(tok.token_id)
            if len(got) == 8:
                victim = ray_local.get_actor(before[0]["actor_name"], namespace="moe_service")
                ray_local.kill(victim)
                t = threading.Thread(target=concurrent)
                t.start()
        t.join(120)
    assert not errors, errors
    assert got == want
    assert other == other_want
    # with every expert on two workers (min_replicas unset: 2 here) the streams need not wait for the restart
    after = eventually(lambda: (w := {w["worker_id"]: w for w in ray_local.get(service.controller().worker_info.remote())})
                       [0]["restarts"] == 1 and w[0]["healthy"] and w, 60, interval=0.2, what="worker 0 restarted")
    assert after[0]["address"] != before[0]["address"]


def test_processes_read_only_their_tensors(ray_local, service):
    from moe_service.checkpoint.names import parse_expert_name

    for w in ray_local.get(service.controller().worker_info.remote()):
        actor = ray_local.get_actor(w["actor_name"], namespace="moe_service")
        info = ray_local.get(actor.ping.remote())
        read_pairs = {parse_expert_name(n) for n in info["reads"]}
        assert None not in read_pairs, "a worker read a non-expert tensor"
        assert read_pairs == {tuple(p) for p in info["hosted"]}
    from ray import serve

    reads = serve.get_app_handle("moe").debug_reads.remote().result()
    assert reads and not [n for n in reads if parse_expert_name(n)], "the gateway read routed experts"


def test_bad_requests_get_clear_errors_and_service_keeps_serving(service, batch):
    with Client(service.address) as client:
        cases = [
            (dict(token_ids=[1, 99999]), grpc.StatusCode.INVALID_ARGUMENT, "token id 99999"),
            (dict(token_ids=[]), grpc.StatusCode.INVALID_ARGUMENT, "prompt is empty"),
            (dict(token_ids=[1, 2], temperature=-1.0), grpc.StatusCode.INVALID_ARGUMENT, "temperature"),
            (dict(token_ids=[1, 2], top_p=1.5), grpc.StatusCode.INVALID_ARGUMENT, "top_p"),
            (dict(token_ids=[1, 2], max_new_tokens=10**6), grpc.StatusCode.INVALID_ARGUMENT, "max_new_tokens"),
            (dict(token_ids=list(range(3, 250)), max_new_tokens=20), grpc.StatusCode.INVALID_ARGUMENT, "at most 256"),
        ]
        for kwargs, code, words in cases:
            with pytest.raises(grpc.RpcError) as err:
                list(client.generate(**kwargs))
            assert err.value.code() == code, kwargs
            assert words in err.value.details(), (kwargs, err.value.details())
            assert len(client.generate_ids(batch[1], max_new_tokens=3)) == 3
        with pytest.raises(grpc.RpcError) as err:
            client.forward([[1, 300]])
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "token id 300" in err.value.details()


def test_model_info_and_health_drain(ray_local, service):
    with Client(service.address) as client:
        info = client.model_info()
        assert info.routed_experts_per_layer == 8 and info.expert_workers == 2
        assert info.limits.max_new_tokens > 0 and info.kv_cache_bytes_per_token > 0
        assert client.health() == "SERVING"
        ray_local.get(service.controller().drain.remote())
        deadline_ok = False
        for _ in range(100):
            if client.health() == "NOT_SERVING":
                deadline_ok = True
                break
            threading.Event().wait(0.1)  # the gateway notices the drain within its poll period
        assert deadline_ok


def test_worker_that_cannot_load_fails_loudly(ray_local, tmp_path):
    """A missing expert tensor: the controller's start fails naming it, and nothing reports healthy."""
    from safetensors.torch import load_file, save_file

    from moe_service.serving.control.actor import ControllerActor

    write_checkpoint(tmp_path, ORACLE_CONFIG)
    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["model.layers.1.mlp.experts.3.up_proj.weight"]
    save_file(tensors, tmp_path / "model.safetensors")
    ctl = ControllerActor.options(name="broken_controller", namespace="moe_service").remote(
        service_config(tmp_path, workers=2))
    try:
        with pytest.raises(Exception, match=r"(?s)expert worker \d failed to start.*experts.3.up_proj.weight"):
            ray_local.get(ctl.start.remote(), timeout=120)
        table = ray_local.get(ctl.table.remote())
        assert not table["ready"]
    finally:
        ray_local.get(ctl.shutdown.remote())
        ray_local.kill(ctl)
