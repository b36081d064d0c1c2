"""cluster/local-multinode.sh as an operator runs it: a head, a gateway node and a worker node with Ray's
token authentication, on free ports; the service deployed with `serve deploy` and with
`moe-service serve --ray-address`; experts on the worker node, the gateway on the gateway node, the
same tokens as in-process; and `down` leaves no process behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from moe_service import load_model
from moe_service.client import Client
from moe_service.engine.engine import Engine
from moe_service.engine.sampling import SamplingParams
from moe_service.serving.local import free_port
from tests.support import Pending, eventually

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "cluster" / "local-multinode.sh"
BIN = Path(sys.executable).parent
PROMPT = [1, 5, 9, 33]
IMPORTS = "import moe_service.cli, moe_service.serving.local, ray"  # what `moe-service serve` loads first
AUTH_QUESTION_S = 5.0  # check_cluster_auth's timeout for its one question to the cluster


def run(cmd: list[str], env: dict, timeout: float = 180, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode:
        raise AssertionError(f"{cmd} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def processes_of(temp: str) -> set[int]:
    """The running processes that name `temp` in their command line, and all their descendants (Ray's
    agents and workers rename themselves)."""
    parent, roots = {}, set()
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            state, ppid = (d / "stat").read_text().rsplit(")", 1)[1].split()[:2]
            if state != "Z":
                parent[int(d.name)] = int(ppid)
                if temp.encode() in (d / "cmdline").read_bytes():
                    roots.add(int(d.name))
        except OSError:
            continue
    found = set(roots)
    while True:
        children = {p for p, pp in parent.items() if pp in found} - found
        if not children:
            return found
        found |= children


def wait_serving(address: str, timeout_s: float = 180) -> None:
    with Client(address) as c:
        def serving():
            try:
                health = c.health()
            except Exception as e:  # not up yet
                return Pending(repr(e))
            return health == "SERVING" or Pending(health)

        eventually(serving, timeout_s, interval=0.5, what=f"{address} reporting SERVING")


PLACEMENT = """
import json, ray
from ray import serve
ray.init(address="{address}", namespace="moe_service", log_to_driver=False)
resources = {{n["NodeID"]: n["Resources"] for n in ray.nodes() if n["Alive"]}}
ctl = ray.get_actor("moe_controller", namespace="moe_service")
workers = [ray.get(ray.get_actor(w["actor_name"], namespace="moe_service").ping.remote())["node_id"]
           for w in ray.get(ctl.worker_info.remote())]
gateway = serve.get_app_handle("moe").debug_state.remote().result()["node_id"]
print(json.dumps({{"workers": [resources[n] for n in workers], "gateway": resources[gateway]}}))
"""

STOP_CONTROLLER = """
import ray
ray.init(address="{address}", namespace="moe_service", log_to_driver=False)
ctl = ray.get_actor("moe_controller", namespace="moe_service")
ray.get(ctl.shutdown.remote())
ray.kill(ctl, no_restart=True)
"""


def check_placement_and_tokens(env: dict, address: str, grpc_address: str, want: list[int]) -> None:
    placed = json.loads(run([str(BIN / "python"), "-c", PLACEMENT.format(address=address)], env).stdout.splitlines()[-1])
    assert placed["workers"] and all("expert_worker" in r for r in placed["workers"]), placed
    assert "gateway" in placed["gateway"], placed
    with Client(grpc_address) as c:
        assert c.generate_ids(PROMPT, max_new_tokens=8, ignore_eos=True) == want


def test_local_cluster_with_token_auth(tmp_path):
    ports = {"MOE_RAY_PORT": free_port(), "MOE_DASHBOARD_PORT": free_port(), "MOE_CLIENT_PORT": free_port(),
             "MOE_PORT_BASE": free_port(block=300)}
    temp = f"/tmp/moe-ray-test-{os.getpid()}"
    base = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_AUTH", "RAY_ADDRESS"))}
    base.update({k: str(v) for k, v in ports.items()}, MOE_WORKER_NODES="1", MOE_GPUS_PER_NODE="2",
                MOE_HEAD_CPUS="2", MOE_CLUSTER_DIR=str(tmp_path / "cluster"), MOE_RAY_TEMP=temp,
                PATH=f"{BIN}:{os.environ['PATH']}")
    address = f"127.0.0.1:{ports['MOE_RAY_PORT']}"
    want = Engine(load_model("tiny")).generate([PROMPT], SamplingParams(max_new_tokens=8, ignore_eos=True))[0].output
    serving = None
    run([str(SCRIPT), "up"], base)
    try:
        token_path = tmp_path / "cluster" / "auth_token"
        assert token_path.stat().st_mode & 0o777 == 0o600 and len(token_path.read_text().strip()) == 64
        client = dict(base)
        for pair in run([str(SCRIPT), "env"], base).stdout.split("export", 1)[1].split():
            k, v = pair.split("=", 1)
            client[k] = v
        assert client["RAY_AUTH_MODE"] == "token" and client["RAY_AUTH_TOKEN_PATH"] == str(token_path)

        # without the token, `serve --ray-address` says so at once instead of waiting for resources: within
        # twice what its imports take, timed here, and the one question it asks the cluster
        t0 = time.monotonic()
        run([str(BIN / "python"), "-c", IMPORTS], base)
        start_s = time.monotonic() - t0
        t0 = time.monotonic()
        refused = run([str(BIN / "moe-service"), "serve", "--ray-address", address], base, timeout=60, check=False)
        refused_s = time.monotonic() - t0
        assert refused.returncode == 2 and "RAY_AUTH_MODE" in refused.stderr and "token" in refused.stderr
        assert refused_s <= 2 * start_s + AUTH_QUESTION_S, (refused_s, start_s)

        # 1. serve deploy, with the repository's config on free ports
        cfg = yaml.safe_load((ROOT / "cluster" / "serve-config.yaml").read_text())
        grpc_port = free_port()
        cfg["grpc_options"]["port"], cfg["http_options"]["port"] = grpc_port, free_port()
        cfg["applications"][0]["args"].update(workers=2, sd_port=0)
        (tmp_path / "serve.yaml").write_text(yaml.safe_dump(cfg))
        dashboard = f"http://127.0.0.1:{ports['MOE_DASHBOARD_PORT']}"
        run([str(BIN / "serve"), "deploy", str(tmp_path / "serve.yaml"), "--address", dashboard], client)
        wait_serving(f"127.0.0.1:{grpc_port}")
        check_placement_and_tokens(client, address, f"127.0.0.1:{grpc_port}", want)
        run([str(BIN / "serve"), "shutdown", "-y", "--address", dashboard], client)
        run([str(BIN / "python"), "-c", STOP_CONTROLLER.format(address=address)], client)

        # 2. moe-service serve --ray-address, until SIGTERM
        grpc_port = free_port()
        serving = subprocess.Popen(
            [str(BIN / "moe-service"), "serve", "--preset", "tiny", "--ray-address", address, "--workers", "2", "--gpus-per-worker", "1",
             "--gateway-gpus", "1", "--port", str(grpc_port), "--sd-port", "0"],
            env=client, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_serving(f"127.0.0.1:{grpc_port}")
        check_placement_and_tokens(client, address, f"127.0.0.1:{grpc_port}", want)
        serving.send_signal(signal.SIGTERM)
        assert serving.wait(60) == 0
    finally:
        if serving is not None and serving.poll() is None:
            serving.kill()
        started = processes_of(temp)
        run([str(SCRIPT), "down"], base)
    assert len(started) > 6  # the nodes' processes and the service's workers were found
    left = [p for p in started if Path(f"/proc/{p}").exists()
            and not (Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z")]
    assert not left, f"processes of the cluster still running: {left}"
    assert not Path(temp).exists()
