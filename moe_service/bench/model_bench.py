"""Prefill and decode throughput: this model vs transformers eager, same weights, same threads, one run."""

from __future__ import annotations

import torch

from moe_service.bench.common import log, timeit
from moe_service.checkpoint import load_model
from moe_service.model.cache import PagedLatentCache
from moe_service.model.transformer import Transformer


def transformers_twin(model: Transformer):
    """transformers' DeepseekV2ForCausalLM holding the very same tensors (its in-memory layout stacks
    the experts as ours does, so the state dict maps one to one)."""
    from transformers import DeepseekV2Config, DeepseekV2ForCausalLM

    cfg = model.args.to_hf_config()
    cfg.pop("architectures", None)
    cfg.pop("model_type", None)
    cfg.pop("torch_dtype", None)
    hf_cfg = DeepseekV2Config(**cfg)
    with torch.device("meta"):
        hf = DeepseekV2ForCausalLM(hf_cfg)
    state = {(k if k == "lm_head.weight" else "model." + k): v for k, v in model.state_dict().items()}
    hf.load_state_dict(state, strict=True, assign=True)
    hf.model.rotary_emb.__init__(hf_cfg)  # computed buffers were on the meta device
    hf.config._attn_implementation = "eager"
    return hf.eval()


def _hf_decode(hf, prompt: torch.Tensor, steps: int) -> None:
    with torch.no_grad():
        out = hf(prompt, use_cache=True)
        cache = out.past_key_values if hasattr(out, "past_key_values") and out.past_key_values is not None else out.cache
        tok = out.logits[:, -1:].argmax(-1)
        for _ in range(steps):
            out = hf(tok, cache=cache, use_cache=True)
            tok = out.logits[:, -1:].argmax(-1)


def _our_decode(model: Transformer, prompt: torch.Tensor, steps: int) -> None:
    B, T = prompt.shape
    cache = PagedLatentCache.for_rows(model.args, B, T + steps + 1)
    tok = model(prompt, cache=cache, last_only=True).argmax(-1, keepdim=True)
    for i in range(steps):
        start = torch.full((B,), T + i)
        tok = model(tok, cache=cache, start=start, last_only=True).argmax(-1, keepdim=True)


def _pairs(ours, theirs, repeats: int, subtract: tuple[float, float] = (0.0, 0.0)) -> tuple[float, float, float]:
    """Median seconds of each and the median of the per-pair speed ratios (theirs / ours)."""
    import statistics
    import time

    ours(), theirs()  # warm-up
    a, b = [], []
    for _ in range(repeats):
        for fn, out, sub in ((ours, a, subtract[0]), (theirs, b, subtract[1])):
            t0 = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0 - sub)
    return statistics.median(a), statistics.median(b), statistics.median(y / x for x, y in zip(a, b))


def run(preset: str = "bench", prefill_tokens: int = 256, decode_batch: int = 8, decode_steps: int = 16,
        context: int = 64, repeats: int = 3, threads: int | None = None) -> dict:
    if threads:
        torch.set_num_threads(threads)
    log(f"[model bench] building preset {preset!r} and its transformers twin ({torch.get_num_threads()} threads)")
    ours = load_model(preset, progress=True)
    hf = transformers_twin(ours)
    V = ours.args.vocab_size
    g = torch.Generator().manual_seed(0)
    prefill = torch.randint(3, V, (1, prefill_tokens), generator=g)
    prompt = torch.randint(3, V, (decode_batch, context), generator=g)
    with torch.no_grad():
        diff = (ours(prefill[:, :64]) - hf(prefill[:, :64]).logits).abs().max().item()
    log(f"[model bench] same weights check: max |logit diff| = {diff:.2e}")

    results: dict = {"preset": preset, "threads": torch.get_num_threads(), "logit_max_abs_diff": diff}
    # The two models are timed in alternation, and the ratio is the median of per-pair ratios, so
    # the machine's drifting speed cancels out instead of favouring whichever ran in a fast moment.
    log(f"[model bench] prefill: 1 x {prefill_tokens} tokens, {repeats} alternating pairs")
    pre = _pairs(lambda: ours(prefill, last_only=True), lambda: hf(prefill, logits_to_keep=1), repeats)
    log(f"[model bench] decode: batch {decode_batch}, context {context}, {decode_steps} steps, {repeats} pairs")
    # prefill+decode minus prefill, for both, so only decode steps count
    p_ours = timeit(lambda: _our_decode(ours, prompt, 0), repeats)
    p_hf = timeit(lambda: _hf_decode(hf, prompt, 0), repeats)
    dec = _pairs(lambda: _our_decode(ours, prompt, decode_steps), lambda: _hf_decode(hf, prompt, decode_steps),
                 repeats, (p_ours, p_hf))
    n = decode_batch * decode_steps
    for key, (t_ours, t_hf, ratio), count in (("prefill_tokens_per_s", pre, prefill_tokens),
                                              ("decode_tokens_per_s", dec, n)):
        results[key] = {"moe_service": count / t_ours, "transformers": count / t_hf, "ratio": ratio}
    return results


def format_results(r: dict) -> str:
    lines = [f"preset {r['preset']}, {r['threads']} threads, fp32 (max |logit diff| {r['logit_max_abs_diff']:.1e})",
             f"{'':22}{'moe_service':>14}{'transformers':>14}{'ratio':>8}"]
    for k, label in (("prefill_tokens_per_s", "prefill tokens/s"), ("decode_tokens_per_s", "decode tokens/s")):
        v = r[k]
        lines.append(f"{label:22}{v['moe_service']:14.1f}{v['transformers']:14.1f}{v['ratio']:7.2f}x")
    return "\n".join(lines)
