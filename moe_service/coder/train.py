"""The embedded `coder` model: a small DeepSeek-V2 trained with this project's own model code on the Python
standard library's source, so that the default model speaks (Python) and its experts specialise.

`moe-service train` reproduces the checkpoint under moe_service/models/coder (docs/models.md): the corpus and
its held-out files, a byte-level BPE tokenizer trained on the corpus, a token budget, progress, a loss
curve, and a Hugging Face checkpoint that transformers' DeepseekV2ForCausalLM loads with the same logits."""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from moe_service.model.args import ModelArgs

CODER_DIR = Path(__file__).resolve().parents[1] / "models" / "coder"
BOS, EOS, PAD = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<pad>"  # DeepSeek's own special tokens

# every part the service serves: q and kv low-rank MLA with the latent cache, yarn rope as V2's config carries
# it, a dense first layer, shared + group-limited routed experts. About 7M parameters, 14 MB in bf16.
CODER_ARGS = ModelArgs(
    name="coder", vocab_size=4096, hidden_size=256, num_hidden_layers=4, intermediate_size=768,
    max_position_embeddings=4096, bos_token_id=1, eos_token_id=2,
    num_attention_heads=4, q_lora_rank=128, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16,
    v_head_dim=32, rope_theta=10000.0,
    rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024, "beta_fast": 32,
                  "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707},
    n_routed_experts=16, n_shared_experts=1, num_experts_per_tok=2, moe_intermediate_size=96,
    topk_method="group_limited_greedy", n_group=4, topk_group=2, norm_topk_prob=False, routed_scaling_factor=1.0,
    first_k_dense_replace=1,
)

# held out of training (and of the tokenizer): the evaluation text, and `moe-service experts`' default sample
HELD_OUT = ("textwrap.py", "heapq.py", "bisect.py", "fractions.py", "json/decoder.py", "colorsys.py",
            "shlex.py", "graphlib.py")


@dataclass(frozen=True)
class TrainConfig:
    tokens: int = 6_000_000  # the budget: training stops after this many tokens, however long it takes
    seq_len: int = 256
    batch: int = 16
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 50
    weight_decay: float = 0.1
    balance_coef: float = 0.003  # DeepSeek-V2's expert-level balance factor
    seed: int = 0
    threads: int = 2
    vocab_size: int = CODER_ARGS.vocab_size
    eval_tokens: int = 65_536


def stdlib_root() -> Path:
    return Path(os.__file__).resolve().parent


def corpus_files() -> tuple[list[Path], list[Path]]:
    """(training files, held-out files) of this Python's standard library, sorted: no tests, no site-packages."""
    root = stdlib_root()
    skip = {"test", "tests", "idle_test", "site-packages", "__pycache__"}
    files = sorted(p for p in root.rglob("*.py") if not skip & set(p.relative_to(root).parts))
    held = [root / h for h in HELD_OUT]
    missing = [str(h) for h in held if not h.is_file()]
    if missing:
        raise FileNotFoundError(f"held-out files missing from this Python's standard library: {missing}")
    return [f for f in files if f not in set(held)], held


def held_out_prompts(tokenizer, windows: int = 1, n: int = 128) -> list[list[int]]:
    """Prompts from the held-out files: each file's first `windows` x n tokens, n at a time (all files' first
    windows, then their second ...)."""
    ids = [tokenizer.encode(f.read_text(encoding="utf-8", errors="replace")) for f in corpus_files()[1]]
    return [t[w * n:(w + 1) * n] for w in range(windows) for t in ids]


def read(files: list[Path]) -> list[str]:
    return [f.read_text(encoding="utf-8", errors="replace") for f in files]


def train_tokenizer(texts: list[str], vocab_size: int):
    """Byte-level BPE (as DeepSeek's), with DeepSeek's special tokens at ids 0/1/2."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[PAD, BOS, EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return tok


def encode_corpus(tok, texts: list[str], bos: int, eos: int) -> torch.Tensor:
    """Every file as BOS + its tokens + EOS, concatenated (int32)."""
    ids: list[int] = []
    for enc in tok.encode_batch(texts, add_special_tokens=False):
        ids.append(bos)
        ids.extend(enc.ids)
        ids.append(eos)
    return torch.tensor(ids, dtype=torch.int32)


def init_weights(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for name, p in sorted(model.named_parameters()):
        with torch.no_grad():
            if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)


def lr_at(step: int, steps: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    t = (step - cfg.warmup_steps) / max(1, steps - cfg.warmup_steps)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


@torch.no_grad()
def evaluate(model, data: torch.Tensor, seq_len: int, tokens: int) -> float:
    """Mean next-token loss over the first `tokens` of `data`, in windows of seq_len (the in-process model)."""
    from moe_service.model.train import lm_loss

    n = min(tokens, len(data) - 1) // seq_len
    windows = data[: n * seq_len].view(n, seq_len).long()
    losses = [lm_loss(model(windows[i : i + 8]), windows[i : i + 8]).item() * len(windows[i : i + 8])
              for i in range(0, n, 8)]
    return sum(losses) / n


def train(out_dir: str | Path = CODER_DIR, cfg: TrainConfig = TrainConfig(), log=print, loss_png: str | None = None) -> dict:
    """Trains the coder model and writes its checkpoint and training record into out_dir, and the loss curve
    to `loss_png` (default: out_dir/loss.png)."""
    from moe_service.checkpoint.loader import load_model, save_hf_checkpoint
    from moe_service.checkpoint.sources import ModuleSource
    from moe_service.model.train import forward_train, lm_loss
    from moe_service.model.transformer import Transformer

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.threads)
    t0 = time.monotonic()
    train_files, held_files = corpus_files()
    log(f"[train] corpus: {len(train_files)} files of {stdlib_root()} ({len(held_files)} held out)")
    texts = read(train_files)
    tok = train_tokenizer(texts, cfg.vocab_size)
    assert tok.token_to_id(BOS) == CODER_ARGS.bos_token_id and tok.token_to_id(EOS) == CODER_ARGS.eos_token_id
    data = encode_corpus(tok, texts, CODER_ARGS.bos_token_id, CODER_ARGS.eos_token_id)
    held = encode_corpus(tok, read(held_files), CODER_ARGS.bos_token_id, CODER_ARGS.eos_token_id)
    log(f"[train] tokenizer: {tok.get_vocab_size()} tokens; corpus {len(data):,} tokens, held out {len(held):,} "
        f"({time.monotonic() - t0:.0f} s)")

    model = Transformer(CODER_ARGS)
    init_weights(model, cfg.seed)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))
    per_step = cfg.seq_len * cfg.batch
    steps = math.ceil(cfg.tokens / per_step)
    g = torch.Generator().manual_seed(cfg.seed)
    history: list[dict] = []
    t_train = time.monotonic()
    for step in range(steps):
        starts = torch.randint(0, len(data) - cfg.seq_len - 1, (cfg.batch,), generator=g)
        ids = torch.stack([data[s : s + cfg.seq_len] for s in starts.tolist()]).long()
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, cfg)
        logits, aux, routes = forward_train(model, ids)
        loss = lm_loss(logits, ids)
        (loss + cfg.balance_coef * aux).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        rec = {"step": step + 1, "tokens": (step + 1) * per_step, "loss": loss.item(), "balance": aux.item()}
        if (step + 1) % 100 == 0 or step + 1 == steps:
            model.eval()
            rec["held_out_loss"] = evaluate(model, held, cfg.seq_len, cfg.eval_tokens)
            model.train()
        history.append(rec)
        if (step + 1) % 10 == 0 or step + 1 == steps:
            el = time.monotonic() - t_train
            rate = rec["tokens"] / el
            log(f"[train] step {step + 1}/{steps}  {rec['tokens']:,} tokens  loss {rec['loss']:.3f}  balance "
                f"{rec['balance']:.3f}  {rate:,.0f} tokens/s  eta {(cfg.tokens - rec['tokens']) / rate / 60:.1f} min"
                + (f"  held-out {rec['held_out_loss']:.3f}" if "held_out_loss" in rec else ""))
    model.eval()
    held_loss = evaluate(model, held, cfg.seq_len, len(held))
    # the checkpoint: weights in bf16 (the size budget), tokenizer, config; then the record of the run
    save_hf_checkpoint(ModuleSource(model.to(torch.bfloat16)), out)
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "torch_dtype": "bfloat16"}, indent=2))
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": BOS, "eos_token": EOS, "pad_token": PAD,
        "add_bos_token": True, "model_max_length": CODER_ARGS.max_position_embeddings}, indent=2) + "\n")
    # what the shipped checkpoint scores, loaded as the service loads it (bf16 weights, computed in fp32)
    shipped_loss = evaluate(load_model(out), held, cfg.seq_len, len(held))
    record = {"config": asdict(cfg), "torch": torch.__version__, "steps": steps, "train_seconds": time.monotonic() - t_train,
              "corpus_tokens": len(data), "held_out_tokens": len(held), "held_out_files": list(HELD_OUT),
              "held_out_loss": held_loss, "held_out_perplexity": math.exp(held_loss),
              "shipped_held_out_loss": shipped_loss, "shipped_held_out_perplexity": math.exp(shipped_loss),
              "history": history}
    (out / "training.json").write_text(json.dumps(record, indent=1) + "\n")
    plot_loss(history, Path(loss_png) if loss_png else out / "loss.png")
    log(f"[train] done in {(time.monotonic() - t0) / 60:.1f} min: held-out loss {held_loss:.3f} "
        f"(perplexity {math.exp(held_loss):.2f}; shipped in bf16: {shipped_loss:.3f}); checkpoint in {out}")
    return record


def plot_loss(history: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([h["tokens"] / 1e6 for h in history], [h["loss"] for h in history], lw=0.6, label="training batch")
    ev = [h for h in history if "held_out_loss" in h]
    ax.plot([h["tokens"] / 1e6 for h in ev], [h["held_out_loss"] for h in ev], "o-", label="held-out files")
    ax.set_xlabel("tokens (millions)")
    ax.set_ylabel("next-token loss (nats)")
    ax.set_title("coder: training on the Python standard library")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
