"""Arguments several commands share: which model, which sampling settings, a prompt as token ids."""

from __future__ import annotations

import argparse

from moe_service.model.args import DTYPES


def model_source(ns: argparse.Namespace) -> str:
    return ns.model or ns.preset


def add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--model", help="a local Hugging Face DeepSeek-V2/V3 directory (config.json, *.safetensors); "
                   "`info` also takes a known shape: DeepSeek-V2(-Lite), DeepSeek-V3, Kimi-K2")
    g.add_argument("--preset", default="coder", help="a built-in model: coder (default: trained, embedded; "
                   "docs/models.md), tiny, tiny-v3 or bench (random weights, for tests and benchmarks)")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="a stop string (repeatable)")


def sampling(ns: argparse.Namespace):
    from moe_service.engine.sampling import SamplingParams

    return SamplingParams(max_new_tokens=ns.max_new_tokens, temperature=ns.temperature, top_p=ns.top_p,
                          top_k=ns.top_k, seed=ns.seed, stop_strings=tuple(ns.stop),
                          logprobs=getattr(ns, "logprobs", None))


def parse_ids(text: str) -> list[int]:
    try:
        return [int(t) for t in text.replace(",", " ").split()]
    except ValueError:
        raise SystemExit(f"--token-ids expects integers separated by spaces or commas, got {text!r}")
