"""The `moe-service` command."""

from __future__ import annotations

import argparse
import json
import sys

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _model_source(ns: argparse.Namespace) -> str:
    return ns.model or ns.preset


def _add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--model", help="a local Hugging Face DeepSeek-V2 directory (config.json, *.safetensors)")
    g.add_argument("--preset", default="tiny", help="a built-in model: tiny (default) or bench")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="a stop string (repeatable)")


def _sampling(ns: argparse.Namespace):
    from moe_service.sampling import SamplingParams

    return SamplingParams(max_new_tokens=ns.max_new_tokens, temperature=ns.temperature, top_p=ns.top_p,
                          top_k=ns.top_k, seed=ns.seed, stop_strings=tuple(ns.stop))


def cmd_info(ns: argparse.Namespace) -> int:
    from moe_service.checkpoint import open_source
    from moe_service.model.summary import format_summary, summarize

    s = summarize(open_source(_model_source(ns)).args, DTYPES[ns.dtype])
    print(json.dumps(s, indent=2) if ns.json else format_summary(s))
    return 0


def _parse_ids(text: str) -> list[int]:
    try:
        return [int(t) for t in text.replace(",", " ").split()]
    except ValueError:
        raise SystemExit(f"--token-ids expects integers separated by spaces or commas, got {text!r}")


def cmd_generate(ns: argparse.Namespace) -> int:
    params = _sampling(ns)
    if ns.address:
        from moe_service.client import Client

        with Client(ns.address, api_key=ns.api_key) as client:
            kwargs = {"token_ids": _parse_ids(ns.token_ids)} if ns.token_ids else {"prompt": ns.prompt}
            for piece in client.generate(**kwargs, params=params):
                if piece.text:
                    sys.stdout.write(piece.text)
                    sys.stdout.flush()
                if piece.finish_reason:
                    print(f"\n[finish: {piece.finish_reason}; {piece.usage}]", file=sys.stderr)
        return 0
    from moe_service.checkpoint import load_model
    from moe_service.engine import Engine
    from moe_service.tokenizer import load_tokenizer

    source = _model_source(ns)
    model = load_model(source, dtype=DTYPES[ns.dtype], progress=True)
    tok = load_tokenizer(source, model.args)
    ids = _parse_ids(ns.token_ids) if ns.token_ids else tok.encode(ns.prompt or "")
    for step in Engine(model, tok).stream([ids], params):
        sys.stdout.write(step.piece if not ns.ids else f"{step.token} ")
        sys.stdout.flush()
        if step.finish_reason:
            print(f"\n[finish: {step.finish_reason}]", file=sys.stderr)
    return 0


def cmd_bench(ns: argparse.Namespace) -> int:
    from moe_service.bench.common import save_results

    if ns.what == "model":
        from moe_service.bench import model_bench

        r = model_bench.run(ns.preset, threads=ns.threads, repeats=ns.repeats)
        print(model_bench.format_results(r))
    else:
        raise SystemExit(f"unknown benchmark {ns.what!r}")
    print(f"results: {save_results(ns.what, r, ns.out)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="moe-service", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)

    info = sub.add_parser("info", help="architecture summary: parameters, experts, KV bytes per token")
    _add_model_args(info)
    info.add_argument("--json", action="store_true")
    info.set_defaults(fn=cmd_info)

    gen = sub.add_parser("generate", help="generate text, in-process or from a running service (--address)")
    _add_model_args(gen)
    _add_sampling_args(gen)
    gen.add_argument("prompt", nargs="?", default="")
    gen.add_argument("--token-ids", help="the prompt as token ids instead of text, e.g. '1 72 101'")
    gen.add_argument("--ids", action="store_true", help="print token ids instead of text")
    gen.add_argument("--address", help="HOST:PORT of a running service; default: run the model in this process")
    gen.add_argument("--api-key", default=None)
    gen.set_defaults(fn=cmd_generate)

    bench = sub.add_parser("bench", help="benchmarks (results printed and written under --out)")
    bench.add_argument("what", choices=["model"], help="model: this model vs transformers")
    bench.add_argument("--preset", default="bench")
    bench.add_argument("--threads", type=int, default=None)
    bench.add_argument("--repeats", type=int, default=3)
    bench.add_argument("--out", default="bench-results")
    bench.set_defaults(fn=cmd_bench)

    demo = sub.add_parser("demo", help="the README's first command: generate on the embedded default model")
    _add_model_args(demo)
    demo.add_argument("prompt", nargs="?", default="The experts of a mixture")
    demo.set_defaults(fn=cmd_demo)
    return p


def cmd_demo(ns: argparse.Namespace) -> int:
    from moe_service.checkpoint import open_source
    from moe_service.model.summary import format_summary, summarize

    print(format_summary(summarize(open_source(_model_source(ns)).args, DTYPES[ns.dtype])))
    print(f"\nprompt: {ns.prompt!r}\ncompletion (greedy, 32 tokens): ", end="")
    ns.token_ids, ns.ids, ns.address = None, False, None
    ns.max_new_tokens, ns.temperature, ns.top_p, ns.top_k, ns.seed, ns.stop = 32, 0.0, 1.0, 0, None, []
    return cmd_generate(ns)


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    try:
        return ns.fn(ns)
    except (ValueError, FileNotFoundError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
