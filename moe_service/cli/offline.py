"""Commands that need no service: info, experts, calibrate, simulate, train."""

from __future__ import annotations

import argparse
import json
import sys

from moe_service.cli.common import add_model_args, model_source
from moe_service.model.args import DTYPES


def cmd_info(ns: argparse.Namespace) -> int:
    from moe_service.capacity.simulate import model_args
    from moe_service.model.summary import format_summary, summarize

    s = summarize(model_args(model_source(ns)), DTYPES[ns.dtype])
    print(json.dumps(s, indent=2) if ns.json else format_summary(s))
    return 0


def cmd_experts(ns: argparse.Namespace) -> int:
    from pathlib import Path

    from moe_service.checkpoint import load_model
    from moe_service.coder.specialisation import format_table, held_out_sample, plot, specialisation
    from moe_service.engine.tokenizer import HFTokenizer, load_tokenizer

    source = model_source(ns)
    model = load_model(source, dtype=DTYPES[ns.dtype])
    tok = load_tokenizer(source, model.args)
    if not isinstance(tok, HFTokenizer):
        print(f"{source!r} has no tokenizer.json: token classes need text (try --preset coder)", file=sys.stderr)
        return 2
    text = Path(ns.text).read_text() if ns.text else held_out_sample()
    r = specialisation(model, tok, text)
    print(format_table(r))
    if ns.json:
        Path(ns.json).write_text(json.dumps(r))
    plot(r, Path(ns.png))
    print(f"\nheat map: {ns.png}")
    return 0


def cmd_calibrate(ns: argparse.Namespace) -> int:
    from moe_service.bench.placement_bench import calibrate

    calibrate(threads=ns.threads)
    return 0


def cmd_simulate(ns: argparse.Namespace) -> int:
    from pathlib import Path

    from moe_service.capacity import simulate
    from moe_service.capacity.costmodel import device

    dev = device(ns.device, ns.expert_dtype)
    r = simulate.run(ns.model_config, dev, ns.gateways, ns.workers, ns.streams, ns.trace, ns.rtt_us * 1e-6,
                     ns.context, software_s=ns.software_us * 1e-6)
    print(simulate.format_results(r))
    if ns.json:
        Path(ns.json).write_text(json.dumps(r, indent=2))
    if ns.png:
        simulate.plot(ns.model_config, dev, ns.gateways, ns.streams, ns.trace, Path(ns.png))
        print(f"plots (simulated): {ns.png}")
    return 0


def cmd_train(ns: argparse.Namespace) -> int:
    import dataclasses

    from moe_service.coder.train import CODER_DIR, TrainConfig, train

    if ns.draft:
        from moe_service.coder.draft import DraftConfig, train_draft

        draft_cfg = DraftConfig() if not ns.tokens else DraftConfig(tokens=ns.tokens)
        train_draft(ns.out or CODER_DIR, draft_cfg, log=lambda m: print(m, file=sys.stderr, flush=True))
        return 0
    cfg = TrainConfig()
    if ns.tokens:
        cfg = dataclasses.replace(cfg, tokens=ns.tokens)
    train(ns.out or CODER_DIR, cfg, log=lambda m: print(m, file=sys.stderr, flush=True),
          loss_png=ns.loss_png or ("docs/coder-loss.png" if ns.out is None else None))
    return 0


def add_info_parser(sub) -> None:
    info = sub.add_parser("info", help="architecture summary: parameters, experts, KV bytes per token")
    add_model_args(info)
    info.add_argument("--json", action="store_true")
    info.set_defaults(fn=cmd_info)


def add_parsers(sub) -> None:
    """experts, calibrate, simulate, train (info comes first in the help: add_info_parser)."""
    ex = sub.add_parser("experts", help="which experts each kind of Python token chooses, per MoE layer "
                        "(a table and a heat map)")
    add_model_args(ex)
    ex.add_argument("--text", default=None, help="a Python file to run (default: the coder model's held-out files)")
    ex.add_argument("--png", default="experts.png", help="where to write the heat map")
    ex.add_argument("--json", default=None, help="also write the shares as JSON here")
    ex.set_defaults(fn=cmd_experts)

    cal = sub.add_parser("calibrate", help="measure this CPU for the cost model (bandwidth, FLOP/s, per-call cost)")
    cal.add_argument("--threads", type=int, default=1, help="threads, as one expert worker computes (default 1)")
    cal.set_defaults(fn=cmd_calibrate)

    sim = sub.add_parser("simulate", help="SIMULATED capacity planning with the cost model: tokens/s and ITL of "
                         "a cluster for a placement policy (no Ray, no gRPC)")
    sim.add_argument("--model-config", default="DeepSeek-V2", help="a preset, a checkpoint directory, a config.json, "
                     "or DeepSeek-V2 / DeepSeek-V2-Lite (shapes only)")
    sim.add_argument("--device", default="H200", help="H100, H200 (datasheets) or cpu (after moe-service calibrate)")
    sim.add_argument("--expert-dtype", default="bf16", choices=["bf16", "fp8"],
                     help="how the workers store routed experts: fp8 reads one byte a weight (DeepSeek-V3's blocks)")
    sim.add_argument("--gateways", type=int, default=1)
    sim.add_argument("--workers", type=int, default=8)
    sim.add_argument("--streams", type=int, default=64, help="decode streams per gateway")
    sim.add_argument("--context", type=int, default=2048, help="tokens per stream in the KV cache")
    sim.add_argument("--trace", default="zipf:1.2", help="zipf:EXPONENT, or a JSON load window [layers, experts]")
    sim.add_argument("--rtt-us", type=float, default=50.0, help="network round trip per layer call")
    sim.add_argument("--software-us", type=float, default=0.0,
                     help="the dispatch software's own cost per layer call (bench served measures it)")
    sim.add_argument("--json", default=None)
    sim.add_argument("--png", default=None, help="also draw throughput vs workers, before/after a rebalance, "
                     "token vs time placement")
    sim.set_defaults(fn=cmd_simulate)

    tr = sub.add_parser("train", help="train the embedded `coder` model on this Python's standard library "
                        "(about 20 minutes on 2 cores; docs/models.md)")
    tr.add_argument("--out", default=None, help="checkpoint directory (default: the embedded one, moe_service/models/coder)")
    tr.add_argument("--tokens", type=int, default=None, help="the token budget (default: the recorded run's)")
    tr.add_argument("--draft", action="store_true", help="train the model's speculative-decoding draft instead "
                    "(an MTP layer, the model frozen; about 10 minutes): writes OUT/mtp.safetensors and draft.json")
    tr.add_argument("--loss-png", default=None, help="the loss curve (default: docs/coder-loss.png for the "
                    "embedded checkpoint, else OUT/loss.png)")
    tr.set_defaults(fn=cmd_train)
