"""A draft for speculative decoding, trained on a frozen model: one multi-token-prediction (MTP) layer in
DeepSeek-V3's design (engine/speculative.py runs it), shipped beside the checkpoint as `mtp.safetensors`.

`moe-service train --draft` trains the embedded `coder`'s: its `model.safetensors` stays byte-identical; the
draft's tensors (`model.layers.4.*`, as V3 stores its MTP layer) go in their own file, and config.json gains
`num_nextn_predict_layers: 1` and `mtp_dense: true`. The block is dense: a dense draft computes on the
gateway with no expert round trip, where an MoE one pays a round trip per draft token, the cost speculation
exists to spread (docs/models.md).

The draft learns what the model would say, not the text: at position i, from the model's hidden state h_i
and the next token t_{i+1}, its distribution over t_{i+2} is fitted to the model's own at position i + 1
(distillation), the quantity verification accepts on. Acceptance is measured two ways: teacher-forced on
held-out text (`teacher_forced`), and on the model's own greedy continuations of held-out prompts
(`generated`)."""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from moe_service.coder.train import CODER_DIR, corpus_files, encode_corpus, held_out_prompts, lr_at, read
from moe_service.model.args import ModelArgs

DRAFT_FILE = "mtp.safetensors"
RECORD_FILE = "draft.json"


@dataclass(frozen=True)
class DraftConfig:
    tokens: int = 1_500_000  # the budget: training stops after this many tokens
    seq_len: int = 256
    batch: int = 16
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 30
    weight_decay: float = 0.1
    seed: int = 0
    threads: int = 2
    eval_tokens: int = 32_768  # teacher-forced evaluation during training
    prompt_tokens: int = 128  # generated evaluation: the first tokens of each held-out file
    new_tokens: int = 128


def draft_args(args: ModelArgs) -> ModelArgs:
    """The model's args with one dense MTP layer."""
    return dataclasses.replace(args, num_nextn_predict_layers=1, mtp_dense=True)


def draft_logits(model, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ids [B, T] -> (the draft's logits [B, T-2, V] for t_{i+2}, the model's own [B, T-2, V] at i + 1);
    gradients reach the MTP layer only."""
    with torch.no_grad():
        hidden, _ = model.hidden(ids)
        target = model.logits(hidden[:, 1:-1])
    hidden = hidden[:, :-1].clone()  # out of inference mode: the layer's norms keep it for backward
    layer = model.mtp[str(model.args.mtp_layers[0])]
    ctx = model.context(ids[:, :-1])
    h = layer.draft(hidden, model.embed_tokens(ids[:, 1:]).detach(), ctx)
    return layer.logits(h)[:, :-1], target.clone()


def distill_loss(draft: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the draft against the model's distribution, position by position."""
    V = draft.shape[-1]
    return F.cross_entropy(draft.reshape(-1, V).float(), F.softmax(target.reshape(-1, V).float(), dim=-1))


@torch.no_grad()
def teacher_forced(model, data: torch.Tensor, seq_len: int, tokens: int) -> dict:
    """On text (not the model's output): the share of positions where the draft's top token is the model's
    (what a greedy verification accepts), and where it is the text's next-but-one token."""
    n = max(1, min(tokens, len(data) - 1) // seq_len)
    windows = data[: n * seq_len].view(n, seq_len).long()
    agree = truth = total = 0
    for i in range(0, n, 8):
        ids = windows[i:i + 8]
        draft, target = draft_logits(model, ids)
        d = draft.argmax(-1)
        agree += (d == target.argmax(-1)).sum().item()
        truth += (d == ids[:, 2:]).sum().item()
        total += d.numel()
    return {"positions": total, "acceptance": agree / total, "text_accuracy": truth / total}


def generated(model, tokenizer, cfg: DraftConfig, tokens: int = 1) -> dict:
    """On the model's own greedy continuations of held-out prompts (each file's first `prompt_tokens`), one
    sequence at a time: the share of draft tokens accepted, and tokens per step, with `tokens` drafts a step."""
    from moe_service.engine.engine import Engine
    from moe_service.engine.sampling import SamplingParams
    from moe_service.engine.scheduler import SchedulerConfig
    from moe_service.engine.speculative import Speculative

    engine = Engine(model, tokenizer, SchedulerConfig(max_running=1, max_seq_len=cfg.prompt_tokens + cfg.new_tokens + 16),
                    speculative=Speculative(tokens))
    params = SamplingParams(max_new_tokens=cfg.new_tokens, ignore_eos=True)
    prompts = held_out_prompts(tokenizer, n=cfg.prompt_tokens)
    drafted = accepted = steps = decoded = 0
    for ids in prompts:
        seq = engine.add(ids, params)
        while engine.has_work:
            st = engine.step()
            drafted += st.drafted
            accepted += st.accepted
            steps += st.decode_rows > 0
        decoded += len(seq.output) - 1  # the first token comes from the prompt's step
    return {"draft_tokens": tokens, "prompts": len(prompts), "drafted": drafted, "accepted": accepted,
            "acceptance": accepted / max(1, drafted), "tokens_per_step": decoded / max(1, steps)}


def fit_draft(model, sample, cfg: DraftConfig, log=print, held: torch.Tensor | None = None) -> list[dict]:
    """Fits `model`'s first MTP layer to the frozen model: its head (and the norm before it) become the
    model's own, the rest trains on `sample(generator)` -> ids [batch, seq_len] (the routed experts of an MoE
    draft stay as loaded). Returns the loss history; with `held` text, teacher-forced acceptance on it."""
    for p in model.parameters():
        p.requires_grad_(False)
    layer = model.mtp[str(model.args.mtp_layers[0])]
    with torch.no_grad():
        layer.shared_head["head"].weight.copy_(model.lm_head.weight)
        layer.shared_head["norm"].weight.copy_(model.norm.weight)
    trained = [p for n, p in layer.named_parameters() if not n.startswith("shared_head.") and ".experts." not in n]
    for p in trained:
        p.requires_grad_(True)
    opt = torch.optim.AdamW([{"params": [p for p in trained if p.dim() >= 2], "weight_decay": cfg.weight_decay},
                             {"params": [p for p in trained if p.dim() < 2], "weight_decay": 0.0}],
                            lr=cfg.lr, betas=(0.9, 0.95))
    per_step = cfg.seq_len * cfg.batch
    steps = math.ceil(cfg.tokens / per_step)
    log(f"[draft] {sum(p.numel() for p in trained):,} parameters trained, the model frozen; {steps} steps of "
        f"{per_step} tokens")
    g = torch.Generator().manual_seed(cfg.seed)
    history: list[dict] = []
    t0 = time.monotonic()
    layer.train()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, cfg)
        loss = distill_loss(*draft_logits(model, sample(g)))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        rec = {"step": step + 1, "tokens": (step + 1) * per_step, "loss": loss.item()}
        if held is not None and ((step + 1) % 50 == 0 or step + 1 == steps):
            layer.eval()
            rec["held_out_acceptance"] = teacher_forced(model, held, cfg.seq_len, cfg.eval_tokens)["acceptance"]
            layer.train()
        history.append(rec)
        if (step + 1) % 10 == 0 or step + 1 == steps:
            rate = rec["tokens"] / (time.monotonic() - t0)
            log(f"[draft] step {step + 1}/{steps}  loss {rec['loss']:.3f}  {rate:,.0f} tokens/s  eta "
                f"{(cfg.tokens - rec['tokens']) / rate / 60:.1f} min"
                + (f"  held-out acceptance {rec['held_out_acceptance']:.3f}" if "held_out_acceptance" in rec else ""))
    for p in trained:
        p.requires_grad_(False)
    layer.eval()
    return history


def train_draft(model_dir: str | Path = CODER_DIR, cfg: DraftConfig = DraftConfig(), log=print) -> dict:
    """Trains a dense draft for the checkpoint in `model_dir` (its model frozen) on the corpus and writes
    `mtp.safetensors`, the config keys that name it, and `draft.json` (the run, acceptance both ways)."""
    from safetensors.torch import save_file

    from moe_service.checkpoint.loader import load_model
    from moe_service.checkpoint.names import hf_name
    from moe_service.coder.train import init_weights
    from moe_service.engine.tokenizer import load_tokenizer
    from moe_service.model.transformer import MTPLayer

    out = Path(model_dir)
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.threads)
    t0 = time.monotonic()
    model = load_model(out)
    args = model.args = draft_args(model.args)
    layer = MTPLayer(args, args.mtp_layers[0])
    init_weights(layer, cfg.seed)
    model.mtp = torch.nn.ModuleDict({str(args.mtp_layers[0]): layer})
    tokenizer = load_tokenizer(str(out), args)
    train_files, held_files = corpus_files()
    data = encode_corpus(tokenizer.tok, read(train_files), args.bos_token_id, args.eos_token_id)
    held = encode_corpus(tokenizer.tok, read(held_files), args.bos_token_id, args.eos_token_id)

    def sample(g: torch.Generator) -> torch.Tensor:
        starts = torch.randint(0, len(data) - cfg.seq_len - 1, (cfg.batch,), generator=g)
        return torch.stack([data[s: s + cfg.seq_len] for s in starts.tolist()]).long()

    t_train = time.monotonic()
    history = fit_draft(model, sample, cfg, log, held)
    # the draft's tensors, in the checkpoint's dtype and names; the model's own file is not touched
    config = json.loads((out / "config.json").read_text())
    dtype = getattr(torch, config.get("torch_dtype", "float32"))
    # (not its head: a copy of the model's, which the loader reads in its place)
    tensors = {hf_name(f"mtp.{args.mtp_layers[0]}.{n}"): p.detach().to(dtype).contiguous()
               for n, p in layer.named_parameters() if not n.startswith("shared_head.head.")}
    save_file(tensors, out / DRAFT_FILE, metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps({**config, "num_nextn_predict_layers": 1, "mtp_dense": True},
                                                indent=2))
    # acceptance of the shipped draft, loaded as the service loads it
    shipped = load_model(out, with_mtp=True)
    record = {"config": asdict(cfg), "torch": torch.__version__, "steps": len(history),
              "train_seconds": time.monotonic() - t_train, "history": history,
              "teacher_forced": teacher_forced(shipped, held, cfg.seq_len, len(held)),
              "generated": [generated(shipped, tokenizer, cfg, k) for k in (1, 2, 3)]}
    (out / RECORD_FILE).write_text(json.dumps(record, indent=1) + "\n")
    log(f"[draft] done in {(time.monotonic() - t0) / 60:.1f} min: acceptance teacher-forced "
        f"{record['teacher_forced']['acceptance']:.3f}, generated "
        + ", ".join(f"k={r['draft_tokens']}: {r['acceptance']:.3f} ({r['tokens_per_step']:.2f} tokens/step)"
                    for r in record["generated"]) + f"; {out / DRAFT_FILE}")
    return record
