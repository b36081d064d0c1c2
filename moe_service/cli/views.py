"""Operator views over the controller's HTTP endpoint: placement, rebalance, a live stats screen."""

from __future__ import annotations

import json
import sys
import time
import urllib.request


def fetch(address: str, path: str, method: str = "GET", timeout: float = 600.0, api_key: str | None = None) -> dict:
    """The controller's JSON answer; `api_key` is the admin key that changing state (POST) needs."""
    headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
    req = urllib.request.Request(f"http://{address}{path}", method=method, data=b"" if method == "POST" else None,
                                 headers=headers)
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.load(r)


def _bar(value: float, top: float, width: int = 30) -> str:
    n = 0 if top <= 0 else round(width * value / top)
    return "#" * n + "." * (width - n)


def format_placement(stats: dict) -> str:
    lines = [f"placement version {stats['version']}, load window {stats['window_s']:.0f}s "
             f"({stats['load_tokens']:.0f} routed tokens)"]
    if "min_replicas" in stats:
        lines.append(f"every expert on {stats['min_replicas']} worker(s): {stats['redundancy']}")
    loads = stats.get("worker_load", [])
    top = max(loads, default=0)
    for w in stats["workers"]:
        wid = w["worker_id"]
        load = loads[wid] if wid < len(loads) else 0.0
        hosted = stats.get("placement", {}).get(str(wid), [])
        state = "up" if w["healthy"] else "DOWN"
        standby = (f" ({w['standbys']} standby, {w['standby_bytes'] / 2**20:.0f} MiB)" if w.get("standbys") else "")
        lines.append(f"worker {wid:>2} {state:4} {w['address'] or '-':>21}  {len(hosted):4} replicas{standby}  "
                     f"load {load:10.0f} {_bar(load, top)}")
    bal = stats.get("balancedness", {})
    if bal:
        lines.append("balancedness per layer: " + "  ".join(f"L{k}={v:.3f}" for k, v in bal.items()))
    return "\n".join(lines)


def format_hottest(stats: dict, n: int = 10) -> str:
    rows = stats.get("hottest", [])[:n]
    if not rows:
        return "no routed tokens in the window yet"
    top = rows[0]["tokens"]
    return "\n".join(["hottest experts (layer, expert): tokens, replicas"] + [
        f"  L{r['layer']:<3} E{r['expert']:<4} {r['tokens']:10.0f}  x{r['replicas']}  {_bar(r['tokens'], top, 20)}"
        for r in rows])


def format_rebalance(r: dict) -> str:
    before, after = r["balancedness_before"], r["balancedness_after"]
    mean = lambda xs: sum(xs) / max(1, len(xs))  # noqa: E731
    lines = [f"{'applied' if r.get('applied') else 'plan (not applied)'}: {r['workers']} workers, "
             f"{r['moves'] if r['moves'] is not None else 'n/a'} replica moves, over {r['load_tokens']:.0f} tokens",
             f"balancedness mean {mean(before):.3f} -> {mean(after):.3f} (min {min(before, default=1):.3f} -> "
             f"{min(after, default=1):.3f})"]
    if "predicted_expert_stage_s_before" in r:
        lines.append(f"predicted expert stage per layer (objective: time) {r['predicted_expert_stage_s_before'] * 1e6:.1f}"
                     f" -> {r['predicted_expert_stage_s_after'] * 1e6:.1f} us (gain {r['gain']:.1%})")
    return "\n".join(lines)


def stats_screen(address: str, interval_s: float = 2.0, iterations: int | None = None) -> None:
    """Redraws per-worker load and the hottest experts until Ctrl-C (or `iterations` frames)."""
    i = 0
    try:
        while iterations is None or i < iterations:
            s = fetch(address, "/stats", timeout=10)
            frame = f"moe-service @ {address}   {time.strftime('%H:%M:%S')}\n\n{format_placement(s)}\n\n{format_hottest(s)}\n"
            if sys.stdout.isatty():
                sys.stdout.write("\x1b[2J\x1b[H")
            sys.stdout.write(frame + "\n")
            sys.stdout.flush()
            i += 1
            if iterations is None or i < iterations:
                time.sleep(interval_s)  # the refresh period
    except KeyboardInterrupt:
        pass
