"""What a lost expert worker costs a stream: the soak schedule an operator tried (8 streaming clients, 3 workers,
a worker SIGKILLed every 15 s, a rebalance forced every 10 s), each request's longest wait between two of its
tokens, beside the same schedule without kills, in one run; with every expert on one worker (min_replicas 1,
before) and on two (min_replicas 2).

Every output is checked against the in-process engine's: a wrong token or a failed request counts."""

from __future__ import annotations

import json
import os
import random
import signal
import threading
import time
import urllib.request

import numpy as np

from moe_service.bench.common import log, save_figure

CLIENTS, NEW_TOKENS, KILL_EVERY_S, REBALANCE_EVERY_S = 8, 24, 15.0, 10.0


class GapClients:
    """`clients` streaming clients sending the prompts round and round, each output checked against
    `reference`; per request, the longest wait between tokens. `failed`: the errors; `wrong`: (prompt index,
    tokens) of every output that differs."""

    def __init__(self, address: str, prompts: list[list[int]], reference: list[list[int]], clients: int = CLIENTS) -> None:
        self.address, self.prompts, self.reference = address, prompts, reference
        self.stop = threading.Event()
        self.gaps: list[float] = []
        self.failed: list[str] = []
        self.wrong: list[tuple[int, list[int]]] = []
        self.threads = [threading.Thread(target=self._run, args=(i,)) for i in range(clients)]
        for t in self.threads:
            t.start()

    def _run(self, i: int) -> None:
        from moe_service.client import Client

        with Client(self.address) as c:
            k = i
            while not self.stop.is_set():
                j = k % len(self.prompts)
                got, times = [], []
                try:  # one message per token (stream_interval 0), so each token's arrival is its own
                    for t in c.generate(token_ids=self.prompts[j], max_new_tokens=NEW_TOKENS, ignore_eos=True,
                                        timeout_s=120, stream_interval=0):
                        if t.token_id >= 0:
                            got.append(t.token_id)
                            times.append(time.perf_counter())
                except Exception as e:
                    self.failed.append(repr(e))
                    continue
                if got != self.reference[j]:
                    self.wrong.append((j, got))
                self.gaps.append(float(np.diff(times).max()) if len(times) > 1 else 0.0)
                k += 1

    @property
    def done(self) -> int:
        """Requests finished."""
        return len(self.gaps)

    def finish(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(180)


def _kill_one(ctl, rng: random.Random) -> None:
    """SIGKILL a healthy worker's process, as the operator's soak did."""
    import ray

    healthy = [w for w in ray.get(ctl.worker_info.remote()) if w["healthy"]]
    if len(healthy) < 2:  # the last kill's worker is not back yet: skip this one
        return
    w = rng.choice(healthy)
    actor = ray.get_actor(w["actor_name"], namespace="moe_service")
    os.kill(ray.get(actor.ping.remote())["pid"], signal.SIGKILL)


def _histogram(text: str, name: str) -> tuple[float, float]:
    """(sum, count) of a histogram over every series in a /metrics page."""
    total = count = 0.0
    for line in text.splitlines():
        if line.startswith(f"{name}_sum"):
            total += float(line.rsplit(" ", 1)[1])
        elif line.startswith(f"{name}_count"):
            count += float(line.rsplit(" ", 1)[1])
    return total, count


def _service_metrics(ctl) -> dict:
    import ray

    sd = ray.get(ctl.http_address.remote())
    stall = [0.0, 0.0]
    for t in json.load(urllib.request.urlopen(f"http://{sd}/targets", timeout=10)):
        if t["labels"].get("component") == "gateway":
            text = urllib.request.urlopen(f"http://{t['targets'][0]}/metrics", timeout=10).read().decode()
            s, n = _histogram(text, "moe_worker_loss_stall_seconds")
            stall[0], stall[1] = stall[0] + s, stall[1] + n
    restored = _histogram(urllib.request.urlopen(f"http://{sd}/metrics", timeout=10).read().decode(),
                          "moe_redundancy_restored_seconds")
    return {"stall_sum_s": stall[0], "stalls": stall[1], "restored_sum_s": restored[0], "restorations": restored[1]}


def phase(svc, prompts, reference, seconds: float, kills: bool, seed: int) -> dict:
    import ray

    ctl, rng = svc.controller(), random.Random(seed)
    before = _service_metrics(ctl)
    clients = GapClients(svc.address, prompts, reference)
    t0 = time.monotonic()
    next_kill, next_rebalance, next_log, killed, rebalanced = t0 + KILL_EVERY_S, t0 + REBALANCE_EVERY_S, t0, 0, 0
    try:
        while (now := time.monotonic()) - t0 < seconds:
            if kills and now >= next_kill:
                _kill_one(ctl, rng)
                killed, next_kill = killed + 1, next_kill + KILL_EVERY_S
            if now >= next_rebalance:
                ray.get(ctl.rebalance.remote(force=True), timeout=120)
                rebalanced, next_rebalance = rebalanced + 1, next_rebalance + REBALANCE_EVERY_S
            if now >= next_log:
                log(f"[soak bench]   {now - t0:4.0f}/{seconds:.0f} s: {len(clients.gaps)} requests, {killed} kills")
                next_log += 30
            time.sleep(0.1)  # the schedule's clock
    finally:
        clients.finish()
    after = _service_metrics(ctl)
    gaps = np.array(clients.gaps or [0.0])
    return {"kills": killed, "rebalances": rebalanced, "requests": len(clients.gaps), "failed": len(clients.failed),
            "wrong": len(clients.wrong), "p99_longest_gap_s": float(np.quantile(gaps, 0.99)),
            "max_gap_s": float(gaps.max()), "over_1s": int((gaps > 1.0).sum()),
            "median_longest_gap_s": float(np.median(gaps)), "failures": clients.failed[:3],
            **{k: after[k] - before[k] for k in after}}


def run(seconds: float = 180.0, out_dir: str = "bench-results", settings: tuple[int, ...] = (1, 2)) -> dict:
    import ray
    import torch

    from moe_service import load_model
    from moe_service.bench.common import local_service
    from moe_service.engine.engine import Engine
    from moe_service.engine.sampling import SamplingParams
    from moe_service.serving.local import start_service

    if not ray.is_initialized():
        from moe_service.serving.proxy_limits import RUNTIME_ENV

        ray.init(num_cpus=2, include_dashboard=False, namespace="moe_service", log_to_driver=False,
                 runtime_env=RUNTIME_ENV)
    g = torch.Generator().manual_seed(14)
    prompts = [[1] + torch.randint(3, 512, (n,), generator=g).tolist() for n in (3, 9, 17, 25, 33, 39, 6, 12)]
    engine = Engine(load_model("tiny"))
    reference = [engine.generate([p], SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True))[0].output
                 for p in prompts]
    rows = []
    for m in settings:
        svc = start_service(local_service(model="tiny", workers=3, min_replicas=m, gateway_torch_threads=1,
                                          rebalance_min_gain=0.0, http_api=False,
                                          scheduler={"max_running": 16, "max_seq_len": 256}))
        try:
            for kills in (False, True):
                log(f"[soak bench] min_replicas {m}, {'kills every 15 s' if kills else 'no kills'}, {seconds:.0f} s")
                rows.append({"min_replicas": m, "with_kills": kills,
                             **phase(svc, prompts, reference, seconds, kills, seed=m)})
        finally:
            svc.shutdown()
    r = {"seconds": seconds, "clients": CLIENTS, "workers": 3, "rows": rows}
    r["plot"] = plot(r, out_dir)
    return r


def plot(r: dict, out_dir: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.4))
    labels = [f"min_replicas {row['min_replicas']}\n{'kills' if row['with_kills'] else 'no kills'}" for row in r["rows"]]
    x = np.arange(len(labels))
    ax.bar(x - 0.2, [row["p99_longest_gap_s"] for row in r["rows"]], 0.4, label="p99 of requests' longest gap")
    ax.bar(x + 0.2, [row["max_gap_s"] for row in r["rows"]], 0.4, label="longest gap")
    ax.set_xticks(x, labels, fontsize=8)
    ax.set_ylabel("seconds between two tokens")
    ax.set_title("a worker SIGKILLed every 15 s, 8 streams, 3 workers (measured, CPU)", fontsize=9)
    ax.legend(fontsize=8)
    return save_figure(fig, out_dir, "soak.png")


def format_results(r: dict) -> str:
    lines = [f"soak: {r['clients']} streaming clients, {r['workers']} workers, {r['seconds']:.0f} s per phase, "
             "a rebalance forced every 10 s",
             f"{'min_rep':>8}{'kills':>6}{'requests':>9}{'failed':>7}{'wrong':>6}{'p50 gap':>9}{'p99 gap':>9}"
             f"{'max gap':>9}{'>1 s':>6}{'stall mean':>11}{'restored':>10}"]
    for row in r["rows"]:
        stall = row["stall_sum_s"] / row["stalls"] if row["stalls"] else 0.0
        restored = row["restored_sum_s"] / row["restorations"] if row["restorations"] else 0.0
        lines.append(f"{row['min_replicas']:>8}{row['kills']:>6}{row['requests']:>9}{row['failed']:>7}{row['wrong']:>6}"
                     f"{row['median_longest_gap_s']:>8.2f}s{row['p99_longest_gap_s']:>8.2f}s{row['max_gap_s']:>8.2f}s"
                     f"{row['over_1s']:>6}{stall * 1e3:>9.0f}ms{restored:>9.1f}s")
    return "\n".join(lines) + (f"\nplot: {r['plot']}" if r.get("plot") else "")
