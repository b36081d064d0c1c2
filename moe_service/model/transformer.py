"""The DeepSeek-V2 decoder stack, as one torch module."""

from __future__ import annotations

import torch
from torch import nn

from moe_service.model.args import ModelArgs
from moe_service.model.attention import MLA, StepContext
from moe_service.model.cache import PagedLatentCache, blocks_for
from moe_service.model.layers import MLP, RMSNorm
from moe_service.model.moe import Dispatcher, MoE, StageClock
from moe_service.model.rope import Rotary

# B rows, T new tokens per row, L key positions, D hidden, V vocabulary


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs, layer: int, with_routed_experts: bool = True) -> None:
        super().__init__()
        self.layer = layer
        self.self_attn = MLA(args, layer)
        self.mlp: MoE | MLP = (
            MoE(args, layer, with_routed_experts) if args.is_moe_layer(layer)
            else MLP(args.hidden_size, args.intermediate_size)
        )
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)

    @property
    def is_moe(self) -> bool:
        return isinstance(self.mlp, MoE)

    def attention_block(self, x: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        return x + self.self_attn(self.input_layernorm(x), ctx)

    def ffn_input(self, x: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        """The normalised tokens the FFN sees, padding dropped: [N, D]."""
        h = self.post_attention_layernorm(x).reshape(-1, x.shape[-1])
        return h if ctx.valid_idx is None else h.index_select(0, ctx.valid_idx)

    @staticmethod
    def add_ffn_output(x: torch.Tensor, y: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        if ctx.valid_idx is None:
            return x + y.view_as(x)
        return x.reshape(-1, x.shape[-1]).index_add(0, ctx.valid_idx, y).view_as(x)

    def forward(self, x: torch.Tensor, ctx: StepContext, dispatcher: Dispatcher | None = None) -> torch.Tensor:
        t0 = ctx.clock.mark() if ctx.clock is not None else None
        x = self.attention_block(x, ctx)
        if ctx.clock is not None:
            ctx.clock.add("attention", t0)
        h = self.ffn_input(x, ctx)
        y = self.mlp(h, dispatcher, ctx.clock) if self.is_moe else self.mlp(h)
        return self.add_ffn_output(x, y, ctx)


class MTPLayer(DecoderLayer):
    """DeepSeek-V3's multi-token-prediction (MTP) layer, the draft that proposes the token after next.

    Stored as one more layer after the main ones (`model.layers.{num_hidden_layers + i}`). From the main
    model's hidden state `h_i` at position i (before its final norm) and the embedding of the next token
    t_{i+1}, it computes `eh_proj(cat[enorm(embed(t_{i+1})), hnorm(h_i)])`, the embedding first (as vLLM
    and SGLang read the checkpoint), then this decoder block at position i (MoE where the layer index is an
    MoE layer's, as in V3), with its own KV cache layer; its logits, `shared_head.head(shared_head.norm(.))`,
    predict t_{i+2}. The embedding is the main model's (the checkpoint's copy of it is not read)."""

    def __init__(self, args: ModelArgs, layer: int, with_routed_experts: bool = True) -> None:
        super().__init__(args, layer, with_routed_experts)
        self.enorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.hnorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * args.hidden_size, args.hidden_size, bias=False)
        self.shared_head = nn.ModuleDict({"norm": RMSNorm(args.hidden_size, args.rms_norm_eps),
                                          "head": nn.Linear(args.hidden_size, args.vocab_size, bias=False)})

    def draft(self, hidden: torch.Tensor, next_embeds: torch.Tensor, ctx: StepContext,
              dispatcher: Dispatcher | None = None) -> torch.Tensor:
        """hidden [B, T, D] (the main model's, before its norm) and the next tokens' embeddings [B, T, D] ->
        this layer's hidden state [B, T, D]; `ctx`: the step's, at the main model's positions."""
        x = self.eh_proj(torch.cat([self.enorm(next_embeds), self.hnorm(hidden)], dim=-1))
        return self(x, ctx, dispatcher)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.shared_head["head"](self.shared_head["norm"](h))


class Transformer(nn.Module):
    """`model(input_ids [B, T])` returns logits `[B, T, V]`, as transformers' DeepseekV2ForCausalLM does."""

    def __init__(self, args: ModelArgs, with_routed_experts: bool = True, with_mtp: bool = False) -> None:
        super().__init__()
        self.args = args
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleList(
            DecoderLayer(args, i, with_routed_experts) for i in range(args.num_hidden_layers)
        )
        # the multi-token-prediction layers (drafts) by layer index, where asked for
        self.mtp = nn.ModuleDict({str(l): MTPLayer(args, l, with_routed_experts) for l in args.mtp_layers}
                                 if with_mtp else {})
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
        self.rotary = Rotary(args)

    def context(
        self, input_ids: torch.Tensor, cache: PagedLatentCache | None = None, tables: torch.Tensor | None = None,
        start: torch.Tensor | None = None, num_new: torch.Tensor | None = None,
    ) -> StepContext:
        """Positions, masks and cache coordinates of one step.

        Row b holds `num_new[b]` new tokens (the rest of the row is padding) that follow `start[b]`
        tokens already in the cache, in the blocks `tables[b]` lists (default: the cache's `row_tables`).
        Without a cache, every row starts at position 0.
        """
        B, T = input_ids.shape
        dev = input_ids.device
        start = torch.zeros(B, dtype=torch.long, device=dev) if start is None else start.to(dev).long()
        num_new = torch.full((B,), T, dtype=torch.long, device=dev) if num_new is None else num_new.to(dev).long()
        if cache is not None:
            if tables is None:
                if cache.row_tables is None or B > cache.row_tables.shape[0]:
                    raise ValueError("a paged cache without fixed rows needs each row's block table")
                tables = cache.row_tables[:B]
            tables = tables.to(dev)
        t = torch.arange(T, device=dev)
        positions = start[:, None] + t[None, :]  # [B, T]
        valid = t[None, :] < num_new[:, None]
        if cache is None:
            if bool(start.any()):
                raise ValueError("a step that starts after position 0 needs the KV cache")
            L = T
            keys = t[None, None, :]  # [1, 1, L]
            mask = (keys <= t[None, :, None]) & (keys < num_new[:, None, None])
        else:
            L = int((start + num_new).max())
            if blocks_for(L, cache.block_size) > tables.shape[1]:
                raise ValueError(f"step reaches position {L}; the rows' block tables hold at most "
                                 f"{tables.shape[1] * cache.block_size} tokens")
            keys = torch.arange(L, device=dev)[None, None, :]
            mask = keys <= positions[:, :, None]
        # per step, never per layer: what needs the host to know (a sync on a GPU) is worked out here
        all_valid = bool(valid.all())
        plain_causal = all_valid and L == T and not bool(start.any())
        valid_idx = None if all_valid else valid.reshape(-1).nonzero().squeeze(1)
        new_b = new_t = write_idx = read_idx = None
        if cache is not None:
            read_idx = cache.positions(tables, keys[0].expand(B, L))
            if all_valid:
                write_idx = cache.positions(tables, positions).reshape(-1)
            else:
                # only the real tokens: a padding position may lie past its row's block table
                new_b, new_t = valid.nonzero(as_tuple=True)
                p, k = positions[new_b, new_t], cache.block_size
                write_idx = tables[new_b, p // k] * k + p % k
        return StepContext(
            rot=self.rotary(positions), mask=mask, valid=valid, num_keys=L, cache=cache, start=start,
            num_new=num_new, all_valid=all_valid, plain_causal=plain_causal, valid_idx=valid_idx, new_b=new_b,
            new_t=new_t, write_idx=write_idx, read_idx=read_idx,
        )

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.norm(h))

    @torch.inference_mode()
    def forward(
        self, input_ids: torch.Tensor, cache: PagedLatentCache | None = None, tables: torch.Tensor | None = None,
        start: torch.Tensor | None = None, num_new: torch.Tensor | None = None,
        last_only: bool = False, dispatcher: Dispatcher | None = None, clock: StageClock | None = None,
    ) -> torch.Tensor:
        """input_ids [B, T] -> logits [B, T, V], or [B, V] at each row's last new token if `last_only`.
        `dispatcher` runs the routed experts elsewhere; `clock`, when given, times attention and gating."""
        x, ctx = self.hidden(input_ids, cache, tables, start, num_new, dispatcher, clock)
        if last_only:
            x = x[torch.arange(x.shape[0], device=x.device), ctx.num_new - 1]
        return self.logits(x)

    @torch.inference_mode()
    def hidden(
        self, input_ids: torch.Tensor, cache: PagedLatentCache | None = None, tables: torch.Tensor | None = None,
        start: torch.Tensor | None = None, num_new: torch.Tensor | None = None,
        dispatcher: Dispatcher | None = None, clock: StageClock | None = None,
    ) -> tuple[torch.Tensor, StepContext]:
        """The last layer's hidden states [B, T, D] (before the final norm: what an MTP layer reads), and
        the step's context."""
        ctx = self.context(input_ids, cache, tables, start, num_new)
        ctx.clock = clock
        x = self.embed_tokens(input_ids)
        for layer in self.layers:
            x = layer(x, ctx, dispatcher)
        return x, ctx

    @torch.inference_mode()
    def draft(self, hidden: torch.Tensor, next_ids: torch.Tensor, ctx: StepContext, depth: int = 0,
              dispatcher: Dispatcher | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The MTP layer `depth`'s step over what the main model's step (`ctx`, `hidden` [B, T, D]) computed:
        row b, position t pairs `hidden[b, t]` with `next_ids[b, t]`, the token after it. Returns its hidden
        states [B, T, D] (the next depth's input) and logits [B, T, V], the token after `next_ids`."""
        layer = self.mtp[str(self.args.mtp_layers[depth])]
        h = layer.draft(hidden, self.embed_tokens(next_ids), ctx, dispatcher)
        return h, layer.logits(h)
