"""Which experts each kind of Python token chooses: `moe-service experts`.

Text (by default the coder model's held-out standard-library files) runs through the model in-process; every
token's routed experts are recorded per MoE layer, and each token is given a class from Python's own
`tokenize` module. The result is a class x expert table per layer (shares of the class's routed slots), the
natural skew of each layer (the hottest expert's share against the mean), and a heat map."""

from __future__ import annotations

import io
import keyword
import tokenize
from pathlib import Path
from types import SimpleNamespace

import torch

CLASSES = ("keyword", "identifier", "string", "comment", "number", "operator", "indentation", "newline")


def char_classes(text: str) -> list[str | None]:
    """The token class of every character of `text` (None where tokenize says nothing: spaces between tokens)."""
    starts = [0]
    for line in text.splitlines(keepends=True):
        starts.append(starts[-1] + len(line))
    out: list[str | None] = [None] * len(text)

    def mark(start: tuple[int, int], end: tuple[int, int], cls: str) -> None:
        a, b = starts[start[0] - 1] + start[1], starts[end[0] - 1] + end[1]
        for i in range(a, min(b, len(text))):
            out[i] = cls

    try:
        for t in tokenize.generate_tokens(io.StringIO(text).readline):
            if t.type == tokenize.NAME:
                cls = "keyword" if keyword.iskeyword(t.string) or keyword.issoftkeyword(t.string) else "identifier"
            elif t.type == tokenize.STRING or t.type in _FSTRING:
                cls = "string"
            elif t.type == tokenize.COMMENT:
                cls = "comment"
            elif t.type == tokenize.NUMBER:
                cls = "number"
            elif t.type == tokenize.OP:
                cls = "operator"
            elif t.type == tokenize.INDENT:
                cls = "indentation"
            elif t.type in (tokenize.NEWLINE, tokenize.NL):
                cls = "newline"
            else:
                continue
            mark(t.start, t.end, cls)
    except (tokenize.TokenError, SyntaxError):  # a sample cut mid-statement: what was read is classed
        pass
    return out


_FSTRING = {getattr(tokenize, n) for n in ("FSTRING_START", "FSTRING_MIDDLE", "FSTRING_END") if hasattr(tokenize, n)}


def token_classes(text: str, offsets: list[tuple[int, int]]) -> list[str]:
    """A class per BPE token: that of its first classed character; a token of spaces only is indentation
    (or a newline if it holds one)."""
    chars = char_classes(text)
    out = []
    for a, b in offsets:
        cls = next((chars[i] for i in range(a, b) if chars[i] is not None and not text[i].isspace()), None)
        if cls is None:
            span = text[a:b]
            cls = "newline" if "\n" in span else ("indentation" if span.strip() == "" else
                                                    next((chars[i] for i in range(a, b) if chars[i]), "operator"))
        out.append(cls)
    return out


def held_out_sample(max_chars: int = 40_000) -> str:
    from moe_service.coder.train import corpus_files

    _, held = corpus_files()
    return "".join(p.read_text(encoding="utf-8") for p in held)[:max_chars]


@torch.no_grad()
def route(model, ids: list[int], window: int = 512) -> dict[int, torch.Tensor]:
    """Each MoE layer's chosen experts [N, K] for the tokens `ids`, run in windows of `window` tokens."""
    chosen: dict[int, list[torch.Tensor]] = {layer: [] for layer in model.args.moe_layers}

    class Recorder:  # a dispatcher that runs the layer's own experts and notes what the gate chose
        @staticmethod
        def send(layer: int, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor):
            chosen[layer].append(experts.clone())
            out = model.layers[layer].mlp.experts(x, weights, experts)
            return SimpleNamespace(wait=lambda: out)

    for i in range(0, len(ids), window):
        model(torch.tensor([ids[i : i + window]]), dispatcher=Recorder)
    return {layer: torch.cat(parts) for layer, parts in chosen.items()}


def specialisation(model, tokenizer, text: str) -> dict:
    """Per MoE layer: shares[class][expert] of the class's routed slots, and the layer's skew."""
    enc = tokenizer.tok.encode(text, add_special_tokens=False)
    classes = token_classes(text, enc.offsets)
    routes = route(model, enc.ids)
    E = model.args.n_routed_experts
    out = {"tokens": len(enc.ids), "class_tokens": {c: classes.count(c) for c in CLASSES}, "layers": {}}
    for layer, experts in routes.items():
        counts = torch.zeros(len(CLASSES), E)
        for ci, c in enumerate(CLASSES):
            rows = [i for i, k in enumerate(classes) if k == c]
            if rows:
                counts[ci] = torch.bincount(experts[rows].reshape(-1), minlength=E).float()
        total = counts.sum(0)
        shares = counts / counts.sum(1, keepdim=True).clamp(min=1)
        out["layers"][layer] = {"shares": shares.tolist(), "expert_share": (total / total.sum()).tolist(),
                                "skew": float(total.max() / total.mean())}
    return out


def format_table(r: dict, top: int = 3) -> str:
    lines = [f"{r['tokens']} tokens; tokens per class: " + ", ".join(f"{c} {n}" for c, n in r["class_tokens"].items())]
    for layer, d in r["layers"].items():
        lines.append(f"\nMoE layer {layer}: hottest expert {max(d['expert_share']):.1%} of routed slots, "
                     f"{d['skew']:.2f}x the mean expert")
        lines.append(f"  {'class':12} top experts (share of the class's routed slots)")
        for c, row in zip(CLASSES, d["shares"]):
            if not r["class_tokens"][c]:
                continue
            best = sorted(range(len(row)), key=lambda e: -row[e])[:top]
            lines.append(f"  {c:12} " + "   ".join(f"e{e:<2} {row[e]:5.1%}" for e in best))
    return "\n".join(lines)


def plot(r: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = list(r["layers"])
    fig, axes = plt.subplots(1, len(layers), figsize=(4.2 * len(layers), 3.6), squeeze=False)
    for ax, layer in zip(axes[0], layers):
        im = ax.imshow(r["layers"][layer]["shares"], aspect="auto", cmap="magma", vmin=0)
        ax.set_title(f"MoE layer {layer} (skew {r['layers'][layer]['skew']:.2f}x)")
        ax.set_xlabel("routed expert")
        ax.set_xticks(range(0, len(r["layers"][layer]["expert_share"]), 2))
        ax.set_yticks(range(len(CLASSES)), CLASSES if ax is axes[0][0] else [""] * len(CLASSES))
        fig.colorbar(im, ax=ax, fraction=0.046)
    fig.suptitle("share of each token class's routed slots, per expert (held-out standard-library files)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
