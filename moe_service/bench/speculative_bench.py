"""Speculative decoding on `coder` with 2 expert workers: tokens/s with and without it, and with an oracle
draft (one that replays the plain run's tokens: 100% acceptance, the ceiling), in alternating runs.

The gateway's engine runs in this process over the service's real workers (Ray actors, gRPC), as the
gateway runs it, so that the draft can be swapped (the oracle) and each step's parts timed: the speed-up is
checked against (1 + mean accepted) x t_plain / (t_verify + t_draft), each term measured in the same run.
Greedy, the 8 held-out files' first 128 tokens as prompts, 128 new tokens each (at batch 16, their next 128
tokens too: 16 prompts); every speculative run's output is checked against the plain run's."""

from __future__ import annotations

import statistics
import time

from moe_service.bench.common import local_service, log

PROMPT_TOKENS = 128
NEW_TOKENS = 128
PAIRS = 5  # alternating plain / speculative runs at batch 1
BATCHES = (1, 2, 4, 8, 16)


class Bench:
    """The in-process engine over the service's workers, made afresh per run (same weights, same workers)."""

    def __init__(self, model, tokenizer, remote) -> None:
        from moe_service.coder.train import held_out_prompts

        self.model, self.tokenizer, self.remote = model, tokenizer, remote
        self.prompts = held_out_prompts(tokenizer, 2, PROMPT_TOKENS)
        self.reference: dict[int, dict[tuple, list[int]]] = {}  # each batch size's plain run's output
        self.batch = 1

    def run(self, batch: int, speculative=None) -> dict:
        from moe_service.engine.engine import Engine
        from moe_service.engine.sampling import SamplingParams
        from moe_service.engine.scheduler import SchedulerConfig

        config = SchedulerConfig(max_running=batch, max_seq_len=PROMPT_TOKENS + NEW_TOKENS + 16, prefix_caching=False)
        engine = Engine(self.model, self.tokenizer, config, dispatchers=self.remote.dispatcher, speculative=speculative)
        params = SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True)
        self.batch = batch
        try:
            t0 = time.perf_counter()
            seqs = [engine.add(p, params) for p in self.prompts[:max(8, batch)]]
            decode = {"steps": 0, "seconds": 0.0, "draft_seconds": 0.0, "rows": 0, "tokens": 0, "drafted": 0,
                      "accepted": 0}
            while engine.has_work:
                st = engine.step()
                if st.prefill_rows == 0 and st.decode_rows:  # a pure decode step: the formula's terms
                    decode["steps"] += 1
                    decode["seconds"] += st.seconds
                    decode["rows"] += st.decode_rows
                    decode["drafted"] += st.drafted
                    decode["accepted"] += st.accepted
                    for o in st.outcomes:
                        decode["draft_seconds"] += o.stages.get("draft", 0.0)
                        decode["tokens"] += sum(o.computed)
            wall = time.perf_counter() - t0
        finally:
            engine.close()
        outputs = {tuple(s.prompt): list(s.output) for s in seqs}
        if speculative is None:
            self.reference.setdefault(batch, outputs)
        if outputs != self.reference[batch]:
            raise AssertionError(f"batch {batch}: the output differs from the plain run's")
        new = sum(len(o) for o in outputs.values())
        return {"tokens_per_s": new / wall, "wall_s": wall, "decode": decode}

    def oracle(self, k: int):
        """A draft that replays the plain run's tokens (of this batch size's run)."""
        from moe_service.engine.speculative import Speculative

        def propose(seq, n: int) -> list[int]:
            want = self.reference[self.batch][tuple(seq.prompt)]
            return want[len(seq.output):len(seq.output) + n]
        return Speculative(k, propose)


def _step_terms(plain: dict, spec: dict) -> dict:
    """The model of the speed-up from one plain and one speculative run's decode steps: (1 + mean accepted)
    x t_plain / (t_verify + t_draft), times the ratio of their rows per step (1 at batch 1; above it,
    sequences that finish sooner leave speculative steps with fewer rows)."""
    p, s = plain["decode"], spec["decode"]
    t_plain = p["seconds"] / p["steps"]
    t_spec = s["seconds"] / s["steps"]
    t_draft = s["draft_seconds"] / s["steps"]
    mean_accepted = s["accepted"] / max(1, s["rows"])
    rows = (s["rows"] / s["steps"]) / (p["rows"] / p["steps"])
    predicted = (1 + mean_accepted) * t_plain / t_spec * rows
    measured = (s["tokens"] / s["seconds"]) / (p["tokens"] / p["seconds"])
    return {"t_plain_s": t_plain, "t_verify_s": t_spec - t_draft, "t_draft_s": t_draft,
            "rows_per_step_ratio": rows, "mean_accepted": mean_accepted, "acceptance": s["accepted"] / max(1, s["drafted"]),
            "predicted_decode_speedup": predicted, "measured_decode_speedup": measured}


def run(workers: int = 2, tokens: int = 2, pairs: int = PAIRS, batches: tuple[int, ...] = BATCHES,
        out_dir: str = "bench-results") -> dict:
    import ray

    from moe_service.checkpoint import load_model
    from moe_service.engine.speculative import Speculative
    from moe_service.engine.tokenizer import load_tokenizer
    from moe_service.serving.gateway.remote import RemoteExperts
    from moe_service.serving.gateway.table import routing_table
    from moe_service.serving.local import start_service

    if not ray.is_initialized():
        from moe_service.serving.proxy_limits import RUNTIME_ENV

        ray.init(num_cpus=2, include_dashboard=False, namespace="moe_service", log_to_driver=False,
                 runtime_env=RUNTIME_ENV)
    model = load_model("coder", with_routed_experts=False, with_mtp=True)
    tokenizer = load_tokenizer("coder", model.args)
    svc = start_service(local_service(model="coder", workers=workers, http_api=False, gateway_torch_threads=1))
    remote = RemoteExperts(routing_table(ray.get(svc.controller().table.remote())))
    try:
        b = Bench(model, tokenizer, remote)
        b.run(1)  # warm-up, and the reference the others are checked against
        mtp, oracle = Speculative(tokens), b.oracle(tokens)
        rows = []
        for batch in batches:
            n = pairs if batch == 1 else max(1, pairs // 2)
            runs: dict[str, list[dict]] = {"plain": [], "mtp": [], "oracle": []}
            for i in range(n):
                for name, spec in (("plain", None), ("mtp", mtp), ("oracle", oracle)):
                    runs[name].append(b.run(batch, spec))
                log(f"[speculative bench] batch {batch}, round {i + 1}/{n}: " + ", ".join(
                    f"{name} {r[-1]['tokens_per_s']:.1f}" for name, r in runs.items()) + " tokens/s")
            med = {name: statistics.median(r["tokens_per_s"] for r in rs) for name, rs in runs.items()}
            mid = {name: sorted(rs, key=lambda r: r["tokens_per_s"])[len(rs) // 2] for name, rs in runs.items()}
            rows.append({"batch": batch, "runs": n, "tokens_per_s": med,
                         "mtp_speedup": med["mtp"] / med["plain"], "oracle_speedup": med["oracle"] / med["plain"],
                         "mtp_terms": _step_terms(mid["plain"], mid["mtp"]),
                         "oracle_terms": _step_terms(mid["plain"], mid["oracle"])})
    finally:
        remote.close()
        svc.shutdown()
    r = {"model": "coder", "workers": workers, "draft_tokens": tokens, "prompts": 8,
         "prompt_tokens": PROMPT_TOKENS, "new_tokens": NEW_TOKENS, "rows": rows,
         "needed_acceptance": _needed(rows[0]["mtp_terms"], tokens, 1.3)}
    r["plot"] = plot(r, out_dir)
    return r


def plot(r: dict, out_dir: str) -> str:
    """tokens/s against the batch size: plain, the MTP draft, the oracle."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from moe_service.bench.common import save_figure

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    x = [row["batch"] for row in r["rows"]]
    for name, style in (("plain", "o-"), ("mtp", "s-"), ("oracle", "^--")):
        a.plot(x, [row["tokens_per_s"][name] for row in r["rows"]], style, label=name)
    a.set_xscale("log", base=2)
    a.set_xlabel("sequences decoding together")
    a.set_ylabel("tokens/s")
    a.set_title(f"coder, {r['workers']} workers, {r['draft_tokens']} draft tokens")
    a.legend()
    b.plot(x, [row["mtp_speedup"] for row in r["rows"]], "s-", label="MTP draft")
    b.plot(x, [row["oracle_speedup"] for row in r["rows"]], "^--", label="oracle (100% accepted)")
    b.axhline(1.0, color="grey", lw=0.8)
    b.set_xscale("log", base=2)
    b.set_xlabel("sequences decoding together")
    b.set_ylabel("speed-up over plain decoding")
    b.legend()
    for ax in (a, b):
        ax.grid(alpha=0.3)
    return save_figure(fig, out_dir, "speculative.png")


def _needed(terms: dict, k: int, target: float) -> float | None:
    """The acceptance per draft token (all k alike, chained) the MTP draft needs for `target` at batch 1:
    from target = (1 + a + a^2 + ... + a^k) x t_plain / (t_verify + t_draft)."""
    want = target * (terms["t_verify_s"] + terms["t_draft_s"]) / terms["t_plain_s"] - 1
    lo, hi = 0.0, 1.0
    if sum(hi ** i for i in range(1, k + 1)) < want:
        return None
    for _ in range(50):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if sum(mid ** i for i in range(1, k + 1)) < want else (lo, mid)
    return hi


def format_results(r: dict) -> str:
    lines = [f"speculative decoding on {r['model']}, {r['workers']} workers, {r['draft_tokens']} draft tokens a step; "
             f"{r['prompts']} held-out prompts of {r['prompt_tokens']} tokens (16 at batch 16), {r['new_tokens']} new tokens, greedy "
             "(median of alternating runs; every output checked against the plain run)",
             f"{'batch':>5}{'plain tok/s':>13}{'mtp tok/s':>11}{'oracle tok/s':>14}{'mtp':>7}{'oracle':>8}"
             f"{'accept':>8}{'t_plain':>10}{'t_verify':>10}{'t_draft':>9}{'model':>7}{'decode':>8}"]
    for row in r["rows"]:
        t, m = row["tokens_per_s"], row["mtp_terms"]
        lines.append(f"{row['batch']:>5}{t['plain']:>13.1f}{t['mtp']:>11.1f}{t['oracle']:>14.1f}"
                     f"{row['mtp_speedup']:>6.2f}x{row['oracle_speedup']:>7.2f}x{m['acceptance']:>8.2f}"
                     f"{m['t_plain_s'] * 1e3:>8.1f}ms{m['t_verify_s'] * 1e3:>8.1f}ms{m['t_draft_s'] * 1e3:>7.1f}ms"
                     f"{m['predicted_decode_speedup']:>6.2f}x{m['measured_decode_speedup']:>7.2f}x")
    o = r["rows"][0]["oracle_terms"]
    lines.append(f"batch 1 oracle: model {o['predicted_decode_speedup']:.2f}x, decode measured "
                 f"{o['measured_decode_speedup']:.2f}x; the MTP draft needs acceptance "
                 + (f"{r['needed_acceptance']:.2f}" if r["needed_acceptance"] is not None else "above 1")
                 + " per draft token for 1.3x at batch 1")
    return "\n".join(lines)
