"""The service on a simulated multi-node cluster (ray.cluster_utils.Cluster): a head without GPUs and
two nodes declaring logical GPUs; workers spread across the nodes; losing a whole node."""

from __future__ import annotations

import numpy as np
import pytest
import ray
import torch
from ray import serve
from ray.cluster_utils import Cluster

from moe_service.client import Client
from moe_service.serving.local import start_service
from tests.oracle import write_checkpoint
from tests.test_serving import ORACLE_CONFIG, check_equal_to_transformers, hf_greedy, service_config

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster():
    if ray.is_initialized():  # the session's local Ray (conftest.ray_local): this module connects to its own cluster
        from ray import serve

        serve.shutdown()
        ray.shutdown()
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "num_gpus": 0})
    # room on each node for every expert worker (a node is lost) and the gateway replica
    nodes = [c.add_node(num_cpus=0, num_gpus=4, resources={"expert_worker": 3}) for _ in range(2)]
    ray.init(address=c.address, namespace="moe_service", log_to_driver=False)
    c.wait_for_nodes()
    yield c, nodes
    from ray import serve

    serve.shutdown()
    ray.shutdown()
    c.shutdown()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("cluster")
    return path, write_checkpoint(path, ORACLE_CONFIG)


@pytest.fixture(scope="module")
def batch():
    g = torch.Generator().manual_seed(7)
    return [torch.randint(3, 257, (n,), generator=g).tolist() for n in (13, 5, 21)]


def test_multi_node_service_equals_transformers_and_survives_a_node_loss(cluster, checkpoint, batch):
    c, nodes = cluster
    path, hf = checkpoint
    # the gateway asks for a (logical) GPU, as on a real cluster: it lands on a GPU node, never the head
    cfg = service_config(path, workers=3, worker_resources={"expert_worker": 1}, redundant_experts=2, gateway_gpus=1)
    svc = start_service(cfg)
    try:
        infos = ray.get(svc.controller().worker_info.remote())
        pings = [ray.get(ray.get_actor(w["actor_name"], namespace="moe_service").ping.remote()) for w in infos]
        node_of = {p["worker_id"]: p["node_id"] for p in pings}
        worker_nodes = {n.node_id for n in nodes}
        assert set(node_of.values()) <= worker_nodes and len(set(node_of.values())) == 2, "workers not spread"
        gateway = serve.get_app_handle("moe").debug_state.remote().result()
        assert gateway["node_id"] in worker_nodes and gateway["node_id"] != c.head_node.node_id
        assert gateway["device"] == "cpu"  # a logical GPU is no CUDA device: the replica computes on the CPU
        with Client(svc.address) as client:
            check_equal_to_transformers(client, hf, batch)

            # lose the node that hosts the most workers, of those the gateway is not on (a lost gateway
            # replica is Serve's to restart; its streams are lost with it)
            victim_id = max(worker_nodes - {gateway["node_id"]}, key=lambda n: list(node_of.values()).count(n))
            victim = next(n for n in nodes if n.node_id == victim_id)
            # the node goes while a stream is under way: the stream finishes, exact, without an error
            stream = client.generate(token_ids=batch[1], max_new_tokens=200, ignore_eos=True, timeout_s=120)
            got = [next(stream).token_id for _ in range(4)]
            c.remove_node(victim)
            assert serve.get_app_handle("moe").debug_state.remote().result()["running"] == 1, "stream ended early"
            got += [t.token_id for t in stream if t.token_id >= 0]
            assert got == hf_greedy(hf, batch[1], 200)
            # once replacements are placed on the surviving node, the service is exact again
            got = client.generate_ids(batch[0], max_new_tokens=32, ignore_eos=True, timeout_s=120)
            assert got == hf_greedy(hf, batch[0])
            logits = client.forward(batch[:1])
            with torch.no_grad():
                want = hf(torch.tensor(batch[:1])).logits.numpy()
            assert np.abs(logits - want).max() <= 1e-4
        infos = ray.get(svc.controller().worker_info.remote())
        assert all(w["healthy"] for w in infos)
        assert sum(w["restarts"] for w in infos) >= 1
    finally:
        svc.shutdown()
