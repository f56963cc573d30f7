"""A decoder-only transformer (Llama, Qwen2, Mistral; DeepSeek-V3's multi-head latent
attention with dense MLPs) in the style of gpt-fast.

Numerics follow Hugging Face transformers so that logits match it: RMSNorm is computed
in float32 and cast back before the weight multiply; RoPE uses the "rotate halves"
layout with inv_freq computed in float32; attention is scaled dot-product attention with
a boolean mask (True = may attend).

The cached forward writes the new tokens as pending cache entries and lets each query
see its row's committed entries plus the new tokens its mask allows. That one mechanism
serves prefill, chain decoding, padded batches and token-tree verification.

What differs between architectures is chosen by `ModelConfig` fields through the
registries below the layers: `ARCHITECTURES` (attention layer and its cache), `NORMS`
and `ACTIVATIONS`. Adding one is an entry there, not a flag in every layer.
"""

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.flex_attention import BlockMask

from lm.config import ModelConfig
from lm.flex import flex_attend, tree_block_mask
from lm.kv_cache import CacheStep, KVCache, WindowStep

# What a layer's attention is given: None (causal, no cache), a dense bool mask (batch, 1,
# time, keys), or a FlexAttention block mask.
Mask = torch.Tensor | BlockMask | None


class Transformer(nn.Module):
    """Token ids in, float32 logits out; `config` says which model this is."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        block = ARCHITECTURES[config.architecture].block
        self.layers = nn.ModuleList(block(config) for _ in range(config.n_layers))
        self.norm = NORMS[config.norm](config.dim, config.norm_eps)
        self.output = nn.Linear(config.dim, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        # Cached passes with a tree (or causal) mask attend through FlexAttention block
        # masks (`lm.flex`) instead of SDPA with a dense mask: the verifier's choice on
        # CUDA. Not for multi-head latent attention, sliding-window layers held in rings,
        # `cache_mask` or batch_invariant.
        self.flex_attention = False

    def forward(
        self, input_ids: torch.Tensor, *, return_hidden: bool = False, **inputs: Any
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Logits (batch, time, vocab) in float32 for input_ids (batch, time).

        inputs: `hidden`'s keyword arguments (cache, rows, positions, mask, cache_mask).
        return_hidden: also return the final-norm output (batch, time, dim), the input
            of the classifier.
        """
        hidden = self.hidden(input_ids, **inputs)
        logits = self.logits(hidden)
        return (logits, hidden) if return_hidden else logits

    @property
    def batch_invariant(self) -> bool:
        """Whether every position's output is computed the same way whatever else the
        pass holds (other tree nodes, other sessions, a longer prefill chunk).

        CPU attention kernels split the queries into blocks, so in bfloat16 a token's
        logits in a 17-node tree pass differ from a one-token pass in the last bits and
        near-ties flip greedy decisions (measured: 17 of 30 prompts on a small bf16 model).
        With this on, each query attends to its own keys alone (`per_query_attention`;
        the linear layers and norms are row-wise already on CPU), at a cost the verifier
        benchmark measures (README).
        """
        return all(layer.attention.per_query for layer in self.layers)

    @batch_invariant.setter
    def batch_invariant(self, on: bool) -> None:
        for layer in self.layers:
            layer.attention.per_query = on

    @property
    def dtype(self) -> torch.dtype:
        """What the model computes in (a quantized model's weights are integer codes)."""
        return self.norm.weight.dtype

    def new_cache(
        self,
        rows: int,
        max_len: int,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        window_slack: int = 256,
    ) -> KVCache:
        """An empty cache of `rows` sequences of up to `max_len` tokens, of the kind this
        architecture's attention reads; device and dtype default to the model's.
        window_slack: entries a sliding-window layer keeps beyond its window (`KVCache`)."""
        weight = self.norm.weight  # the compute dtype (`dtype`) and the device
        return ARCHITECTURES[self.config.architecture].cache(
            self.config,
            rows,
            max_len,
            device=weight.device if device is None else device,
            dtype=weight.dtype if dtype is None else dtype,
            window_slack=window_slack,
        )

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The classifier: final-norm hidden states (..., dim) -> float32 logits (..., vocab).
        A caller that needs a few positions' logits gathers them first (the verifier's
        prefill needs none, its rounds only the tree's rows)."""
        return self.output(hidden).float()

    def hidden(
        self,
        input_ids: torch.Tensor,
        *,
        cache: KVCache | None = None,
        rows: Sequence[int] | None = None,
        positions: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        cache_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The final-norm output (batch, time, dim) for input_ids (batch, time).

        positions: (batch, time) RoPE positions; default 0.. without a cache, and
            lengths[rows[b]] + t with one.
        mask: (batch, time, time) bool, [b, t, u] = new token t may attend to new token u;
            default causal. With a cache, every query also sees all committed entries
            of its row. No query may be all-False (give padding mask[b, t, t] = True).
        cache_mask: (batch, time, kv_len) bool over whole cache rows, replacing `mask` and
            the committed-prefix rule, where kv_len = max(lengths[rows]) + time. Lets a
            drafter grow a tree level by level in the cache: each new node sees the
            history and its own ancestors, not its cousins committed before it.
        rows: cache row of each batch row; default 0..batch-1.
        """
        batch, time = input_ids.shape
        if mask is not None and (mask.shape != (batch, time, time) or mask.dtype != torch.bool):
            raise ValueError(
                f"mask: must be bool of shape {(batch, time, time)}, "
                f"got {mask.dtype} {tuple(mask.shape)}"
            )
        step = None if cache is None else self._prepare(cache, rows, batch, time)
        if cache_mask is not None and (
            step is None
            or mask is not None
            or cache_mask.dtype != torch.bool
            or cache_mask.shape != (batch, time, step.kv_len)
        ):
            raise ValueError(
                "cache_mask: needs a cache, no `mask`, and bool shape (batch, time, kv_len); "
                f"got {cache_mask.dtype} {tuple(cache_mask.shape)}"
            )
        if step is None:
            if positions is None:
                positions = torch.arange(time, device=input_ids.device).expand(batch, time)
        else:
            positions = step.write_positions if positions is None else positions
            if self.config.sliding_layers:
                cache.record_positions(step, positions)
        views = self._views(positions, mask, cache_mask, cache, step)
        config = self.config
        x = self.tok_embeddings(input_ids)
        if ARCHITECTURES[config.architecture].scaled_embeddings:  # HF rounds the scale first
            x = x * torch.tensor(config.dim**0.5).to(x.dtype)
        for i, layer in enumerate(self.layers):
            cos, sin, layer_mask = views[i in config.sliding_layers]
            x = layer(x, cos, sin, layer_mask, cache, i, step)
        return self.norm(x)

    def _views(
        self,
        positions: torch.Tensor,
        tree: torch.Tensor | None,
        cache_mask: torch.Tensor | None,
        cache: KVCache | None,
        step: CacheStep | None,
    ) -> dict[bool, tuple[torch.Tensor, torch.Tensor, Mask]]:
        """Per kind of layer (False: full attention, True: a sliding window), its RoPE cos
        and sin and its mask: None for causal, a dense bool (batch, 1, time, keys), or a
        FlexAttention block mask (`flex_attention`)."""
        config, dtype = self.config, self.dtype
        flex = (
            self.flex_attention
            and step is not None
            and cache_mask is None
            and not config.mla
            and not self.batch_invariant
        )
        mask: Mask
        if step is None:
            mask = None if tree is None else tree[:, None]
        elif self._sees_whole_rows(step, tree, cache_mask):
            mask = None  # one query per row, after all of its row: attend needs no mask
        elif flex:
            if tree is None:
                tree = causal_mask(*positions.shape, positions.device)
            mask = tree_block_mask(step.starts, tree, step.kv_len)
        else:
            mask = cached_attention_mask(step, tree) if cache_mask is None else cache_mask[:, None]
        views = {False: (*rope_cos_sin(positions, config.head_dim, config.rope_theta, dtype), mask)}
        if not config.sliding_layers:
            return views
        window = config.sliding_window
        assert window is not None  # ModelConfig checks it
        keys = positions if cache is None or step is None else cache.positions_of(step)
        local_mask: Mask
        if flex and step is not None and step.window is None:
            assert tree is not None
            local_mask = tree_block_mask(
                step.starts, tree, step.kv_len, window=(positions, keys, window)
            )
        else:  # rings read their own columns (`ring_mask`), from the dense mask
            if isinstance(mask, BlockMask):
                assert step is not None
                mask = cached_attention_mask(step, tree)
            local_mask = window_mask(mask, positions, keys, window)
            if step is not None and step.window is not None:
                local_mask = ring_mask(local_mask, step.window)
        theta = config.rope_local_theta or config.rope_theta
        views[True] = (*rope_cos_sin(positions, config.head_dim, theta, dtype), local_mask)
        return views

    def _sees_whole_rows(
        self, step: CacheStep, tree: torch.Tensor | None, cache_mask: torch.Tensor | None
    ) -> bool:
        """Whether each of a cached pass's queries sees every key its row's cache slice
        holds: one new token per row, rows that share their committed length (so kv_len
        is each row's own length), no tree, and attention that reads `attend`'s None as
        that (not latent attention's, per-query or sliding-window layers)."""
        return (
            step.write_slice is not None
            and step.write_positions.shape[1] == 1
            and tree is None
            and cache_mask is None
            and not self.config.mla
            and not self.config.sliding_layers
            and not self.batch_invariant
        )

    def _prepare(
        self, cache: KVCache, rows: Sequence[int] | None, batch: int, time: int
    ) -> CacheStep:
        rows = range(batch) if rows is None else rows
        if len(rows) != batch:
            raise ValueError(f"rows: must have one entry per batch row ({batch}), got {rows}")
        weight = self.norm.weight
        if (cache.dtype, cache.device) != (weight.dtype, weight.device):
            raise ValueError(
                f"cache: {cache.dtype} on {cache.device} must match the model's "
                f"{weight.dtype} on {weight.device}"
            )
        return cache.prepare(rows, time)


class TransformerBlock(nn.Module):
    """Pre-norm residual block: x + attention(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        norm = NORMS[config.norm]
        self.attention_norm = norm(config.dim, config.norm_eps)
        self.attention = ARCHITECTURES[config.architecture].attention(config)
        self.ffn_norm = norm(config.dim, config.norm_eps)
        self.feed_forward = FeedForward(config)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: Mask,
        cache: KVCache | None,
        layer: int,
        step: CacheStep | None,
    ) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x), cos, sin, mask, cache, layer, step)
        return x + self.feed_forward(self.ffn_norm(x))


class SandwichBlock(TransformerBlock):
    """Gemma's block: each half's output is normed again before it joins the residual,
    x + post_norm(attention(norm(x))), then x + post_ffn_norm(mlp(ffn_norm(x)))."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        self.post_attention_norm = NORMS[config.norm](config.dim, config.norm_eps)
        self.post_ffn_norm = NORMS[config.norm](config.dim, config.norm_eps)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: Mask,
        cache: KVCache | None,
        layer: int,
        step: CacheStep | None,
    ) -> torch.Tensor:
        attended = self.attention(self.attention_norm(x), cos, sin, mask, cache, layer, step)
        x = x + self.post_attention_norm(attended)
        return x + self.post_ffn_norm(self.feed_forward(self.ffn_norm(x)))


class Attention(nn.Module):
    """Grouped-query attention: n_heads queries share n_kv_heads keys/values."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.n_heads = config.n_heads
        self.n_kv_heads = config.n_kv_heads
        self.head_dim = config.head_dim
        q_dim, kv_dim = config.n_heads * config.head_dim, config.n_kv_heads * config.head_dim
        self.wq = nn.Linear(config.dim, q_dim, bias=config.qkv_bias)
        self.wk = nn.Linear(config.dim, kv_dim, bias=config.qkv_bias)
        self.wv = nn.Linear(config.dim, kv_dim, bias=config.qkv_bias)
        self.wo = nn.Linear(q_dim, config.dim, bias=False)
        # q, k and v as one layer whose output concatenates them (lm.quantized fuses them,
        # one kernel call instead of three), or None for wq, wk and wv.
        self.wqkv: nn.Module | None = None
        # Each query attends to its own keys alone (Transformer.batch_invariant).
        self.per_query = False
        # None: SDPA's head_dim ** -0.5
        scalar = config.query_pre_attn_scalar
        self.scale = None if scalar is None else scalar**-0.5

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: Mask,
        cache: KVCache | None,
        layer: int,
        step: CacheStep | None,
    ) -> torch.Tensor:
        """x: (batch, time, dim); mask: (batch, 1, time, keys) bool or None for causal."""
        batch, time, _ = x.shape
        q, k, v = self.project(x, cos, sin)
        if cache is not None:
            k, v = cache.update(layer, step, k, v)
        y = attend(q, k, v, mask, per_query=self.per_query, scale=self.scale)
        return self.wo(y.transpose(1, 2).reshape(batch, time, -1))

    def project(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Rotated q (batch, heads, time, head_dim), rotated k and v (batch, kv_heads, ...)."""
        batch, time, _ = x.shape
        heads, kv_heads, head_dim = self.n_heads, self.n_kv_heads, self.head_dim
        if self.wqkv is None:
            q = self.wq(x).view(batch, time, heads, head_dim).transpose(1, 2)
            k = self.wk(x).view(batch, time, kv_heads, head_dim).transpose(1, 2)
            v = self.wv(x).view(batch, time, kv_heads, head_dim).transpose(1, 2)
            return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v
        # one projection, and q and k rotated together
        qkv = self.wqkv(x).view(batch, time, heads + 2 * kv_heads, head_dim).transpose(1, 2)
        qk = apply_rope(qkv[:, : heads + kv_heads], cos, sin)
        # (slices: Tensor.split goes through a Python wrapper, 3 us a call per layer per token)
        q, k = qk[:, :heads], qk[:, heads:]
        return q, k, qkv[:, heads + kv_heads :].to(q.dtype)  # quantized layers give bfloat16


class QKNormAttention(Attention):
    """Gemma 3's attention: each q and k head RMS-normed (its own weight over head_dim)
    before RoPE; otherwise `Attention`."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        self.q_norm = NORMS[config.norm](config.head_dim, config.norm_eps)
        self.k_norm = NORMS[config.norm](config.head_dim, config.norm_eps)

    def project(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        batch, time, _ = x.shape
        shape = (batch, time, -1, self.head_dim)
        if self.wqkv is None:
            q, k, v = self.wq(x), self.wk(x), self.wv(x)
        else:  # quantized: one projection (lm.quantized), bfloat16 out
            q_dim, kv_dim = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
            q, k, v = self.wqkv(x).to(x.dtype).split([q_dim, kv_dim, kv_dim], -1)
        q = self.q_norm(q.view(shape).transpose(1, 2))
        k = self.k_norm(k.view(shape).transpose(1, 2))
        v = v.view(shape).transpose(1, 2)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v


class LatentAttention(nn.Module):
    """Multi-head latent attention (DeepSeek-V2/V3), computed against the cached latent.

    Per token, x (dim) is compressed to a latent c = norm(x @ W_DKV) (kv_lora_rank) and a
    rotated key k_r (head_dim, shared by every head); only [c, k_r] is cached. HF expands c
    into per-head keys k = c @ W_UK_h and values v = c @ W_UV_h for every cached token.
    Here the up-projections are absorbed instead: q_h . k = (q_h @ W_UK_h^T) . c, and
    softmax(.) @ (c @ W_UV_h) = (softmax(.) @ c) @ W_UV_h, so every head attends straight
    to [c, k_r] as one shared key (MQA with kv_lora_rank + head_dim wide keys and
    kv_lora_rank wide values) and nothing per token is ever expanded: the same mechanism
    serves prefill, decode and tree verification. The softmax scale stays HF's,
    (qk_nope_head_dim + head_dim) ** -0.5.

    DeepSeek rotates interleaved pairs (x0, x1), (x2, x3), ... (HF `rope_interleave`): the
    rotary part is read as evens then odds, after which the halves rotation applies.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        assert config.kv_lora_rank and config.qk_nope_head_dim and config.v_head_dim
        self.n_heads = config.n_heads
        self.rank, self.rope_dim = config.kv_lora_rank, config.head_dim
        self.nope_dim, self.v_dim = config.qk_nope_head_dim, config.v_head_dim
        q_out = config.n_heads * (self.nope_dim + self.rope_dim)
        if config.q_lora_rank is None:
            self.wq: nn.Module = nn.Linear(config.dim, q_out, bias=False)
        else:  # HF's q_a_layernorm keeps its own default epsilon, 1e-6
            self.wq = nn.Sequential(
                nn.Linear(config.dim, config.q_lora_rank, bias=False),
                RMSNorm(config.q_lora_rank, 1e-6),
                nn.Linear(config.q_lora_rank, q_out, bias=False),
            )
        self.wkv_a = nn.Linear(config.dim, self.rank + self.rope_dim, bias=False)
        self.kv_norm = RMSNorm(self.rank, 1e-6)
        # (n_heads * (nope + v), rank): row blocks per head, keys' rows then values'
        self.wkv_b = nn.Linear(self.rank, config.n_heads * (self.nope_dim + self.v_dim), bias=False)
        self.wo = nn.Linear(config.n_heads * self.v_dim, config.dim, bias=False)
        self.scale = (self.nope_dim + self.rope_dim) ** -0.5
        self.per_query = False  # as Attention.per_query

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: Mask,
        cache: KVCache | None,
        layer: int,
        step: CacheStep | None,
    ) -> torch.Tensor:
        """x: (batch, time, dim); mask: (batch, 1, time, keys) bool or None for causal."""
        batch, time, _ = x.shape
        heads, rank = self.n_heads, self.rank
        q = self.wq(x).view(batch, time, heads, self.nope_dim + self.rope_dim).transpose(1, 2)
        q_nope, q_rot = q.split([self.nope_dim, self.rope_dim], -1)
        latent, k_rot = self.wkv_a(x).split([rank, self.rope_dim], -1)
        k_rot = k_rot.view(batch, 1, time, self.rope_dim)
        q_rot = apply_rope(_deinterleave(q_rot), cos, sin)
        k_rot = apply_rope(_deinterleave(k_rot), cos, sin)
        entry = torch.cat([self.kv_norm(latent).unsqueeze(1), k_rot], -1)  # (b, 1, t, r + rope)
        if cache is not None:
            (entry,) = cache.update(layer, step, entry)
        up = self.wkv_b.weight.view(heads, self.nope_dim + self.v_dim, rank)
        w_uk, w_uv = up.split([self.nope_dim, self.v_dim], 1)
        query = torch.cat([q_nope @ w_uk, q_rot], -1)  # (batch, heads, time, rank + rope)
        # Every head's queries attend to the same single key head, so they are folded into
        # one head of heads * time queries (as FlashMLA does): SDPA's enable_gqa broadcast
        # of one key head over 16 was measured 75x slower on CPU (decode, 2048 keys).
        keys = entry.shape[2]
        if mask is None:  # causal, no cache
            mask = causal_mask(batch, time, x.device)[:, None]
        mask = mask[:, :, None].expand(batch, 1, heads, time, keys)
        y = attend(
            query.reshape(batch, 1, heads * time, rank + self.rope_dim),
            entry,
            entry[..., :rank],
            mask.reshape(batch, 1, heads * time, keys),
            per_query=self.per_query,
            scale=self.scale,
        )
        y = y.view(batch, heads, time, rank) @ w_uv.transpose(1, 2)  # (b, heads, t, v_dim)
        return self.wo(y.transpose(1, 2).reshape(batch, time, heads * self.v_dim))


def _deinterleave(x: torch.Tensor) -> torch.Tensor:
    """(..., d) as evens then odds: DeepSeek's interleaved rotary pairs in the halves layout."""
    return torch.cat([x[..., 0::2], x[..., 1::2]], -1)


class FeedForward(nn.Module):
    """Gated MLP: down(act(gate(x)) * up(x))."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.gate = nn.Linear(config.dim, config.hidden_dim, bias=False)
        self.up = nn.Linear(config.dim, config.hidden_dim, bias=False)
        self.down = nn.Linear(config.hidden_dim, config.dim, bias=False)
        self.act = ACTIVATIONS[config.activation]
        # gate and up as one layer whose output concatenates them (as Attention.wqkv).
        self.gate_up: nn.Module | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_and_up(x)
        return self.down(self.act(gate) * up)

    def gate_and_up(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (..., dim) -> gate(x), up(x), each (..., hidden), before the activation."""
        if self.gate_up is None:
            return self.gate(x), self.up(x)
        gate, up = self.gate_up(x).chunk(2, -1)
        return gate, up


class RMSNorm(nn.Module):
    """x / rms(x) * weight, normalised in float32 and cast back before the weight (as HF)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # torch's fused kernel: the same bits as x32 * rsqrt(mean(x32^2) + eps) (checked in
        # float32 and bfloat16), in one call instead of five; in float32 with the weight
        # multiply too (the same bits as multiplying after: nothing is cast between).
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return self.weight * normed.to(x.dtype)


class GemmaRMSNorm(nn.Module):
    """x / rms(x) * (1 + weight), all in float32 and cast back after (as HF's Gemma; the
    stored weight is the offset from 1)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return (normed * (1.0 + self.weight.float())).to(x.dtype)


@dataclass(frozen=True)
class ArchitectureParts:
    """What an architecture plugs into the core besides its norm and activation.

    attention: built from the config; forward(x, cos, sin, mask, cache, layer, step) as
        `Attention`, and a `per_query` flag (`Transformer.batch_invariant`).
    cache: built as cache(config, rows, max_len, device=, dtype=, window_slack=) by
        `Transformer.new_cache`; what `attention` reads and writes (`KVCache`'s interface).
    """

    attention: Callable[[ModelConfig], nn.Module]
    cache: Callable[..., KVCache]
    # The residual block, built from the config; forward(x, cos, sin, mask, cache, layer,
    # step) as `TransformerBlock`.
    block: Callable[[ModelConfig], nn.Module] = TransformerBlock
    # Token embeddings multiplied by sqrt(dim) (Gemma).
    scaled_embeddings: bool = False


LLAMA = ArchitectureParts(attention=Attention, cache=KVCache)

# ModelConfig.architecture -> its parts. Qwen2 (q/k/v bias, a config field) and Mistral
# (window clamped to the context, see ModelConfig.from_hf) attend exactly as Llama.
# DeepSeek-V3's cache holds the latent (`lm.kv_cache.cache_layout`), not per-head K/V.
ARCHITECTURES: dict[str, ArchitectureParts] = {
    "LlamaForCausalLM": LLAMA,
    "Qwen2ForCausalLM": LLAMA,
    "MistralForCausalLM": LLAMA,
    "DeepseekV3ForCausalLM": ArchitectureParts(attention=LatentAttention, cache=KVCache),
    "Gemma3ForCausalLM": ArchitectureParts(
        attention=QKNormAttention, cache=KVCache, block=SandwichBlock, scaled_embeddings=True
    ),
}
# ModelConfig.norm -> the norm layer, built as norm(dim, eps).
NORMS: dict[str, Callable[[int, float], nn.Module]] = {
    "rmsnorm": RMSNorm,
    "gemma_rmsnorm": GemmaRMSNorm,
}
# ModelConfig.activation -> the MLP's activation (names as lm.config maps them to HF's).
ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu,
    "relu": F.relu,
    "gelu_tanh": partial(F.gelu, approximate="tanh"),  # HF "gelu_pytorch_tanh" (Gemma)
}


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: Mask,
    *,
    per_query: bool,
    scale: float | None = None,
) -> torch.Tensor:
    """Scaled dot-product attention of q (batch, heads, time, d) over k (batch, kv_heads,
    keys, d) and v (batch, kv_heads, keys, d_v), kv_heads dividing heads; out (batch,
    heads, time, d_v). mask: (batch, 1, time, keys) bool; None for causal, which with one
    query (a decode step after its whole row) is every key; or a
    FlexAttention block mask (`lm.flex`).
    per_query: `per_query_attention` (Transformer.batch_invariant) instead of one call.

    On CPU, SDPA reads each kv head for its query group (enable_gqa): no copy of the whole
    cache per layer, which repeat_kv makes (1.9 of 15 ms per decoded token, SmolLM2 int4,
    200 cached tokens). CUDA's masked kernels lack it, so there the heads are repeated.
    """
    if isinstance(mask, BlockMask):
        return flex_attend(q, k, v, mask, scale)
    repeat = q.shape[1] // k.shape[1]
    gqa = repeat > 1 and q.device.type == "cpu"
    if repeat > 1 and not gqa:
        k, v = repeat_kv(k, repeat), repeat_kv(v, repeat)
    if per_query:
        return per_query_attention(q, k, v, mask, enable_gqa=gqa, scale=scale)
    causal = mask is None and q.shape[2] > 1  # one query after its row's keys sees them all
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=causal, scale=scale, enable_gqa=gqa
    )


# Batch-invariant attention: at most this many gathered key elements (queries x heads x
# keys x head_dim) per kernel call.
INVARIANT_CALL_ELEMENTS = 1 << 25


def per_query_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    *,
    enable_gqa: bool = False,
    scale: float | None = None,
) -> torch.Tensor:
    """Attention computed so that a query's output depends on its own keys alone.

    q: (batch, heads, time, head_dim); k, v: (batch, heads, keys, head_dim), or
    (batch, kv_heads, keys, head_dim) with enable_gqa (SDPA's; v may be narrower or wider
    than q and k, and the output is as wide as v); scale: SDPA's; mask:
    (batch, 1, time, keys) bool, or None for causal. Each query attends to exactly the
    keys it may see, gathered in order into a contiguous tensor, as a batch element of
    its own with no mask: the same shapes, values and order whether it is alone in a
    one-token pass or one node of a tree beside other sessions' trees, so the kernel
    does the same arithmetic. (A fused kernel over the whole block splits keys and
    queries into blocks whose boundaries move with the pass's shape.) Queries that see
    as many keys share calls: half-precision SDPA on CPU was measured to give each batch
    element the same bits whatever the batch. (Padding keys to shared lengths under a
    mask, to share more calls, ran 3x slower on CPU.)
    """
    batch, heads, time, dim = q.shape
    if mask is None:  # causal, no cache: query t sees keys 0..t
        mask = causal_mask(batch, time, q.device)[:, None]
    visible = mask[:, 0]  # (batch, time, keys)
    counts = visible.sum(-1).flatten().tolist()  # keys each query sees, query-major
    keys = visible.nonzero()[:, 2].split(counts)  # per query, in order
    groups: dict[int, list[int]] = {}
    for query, count in enumerate(counts):
        groups.setdefault(count, []).append(query)
    out = q.new_empty(batch, heads, time, v.shape[-1])
    for count, queries in groups.items():
        step = max(1, INVARIANT_CALL_ELEMENTS // (heads * count * dim))
        for start in range(0, len(queries), step):
            part = queries[start : start + step]
            seen = torch.stack([keys[query] for query in part])  # (part, count)
            index = torch.tensor(part, device=q.device)
            rows, steps = index // time, index % time
            out[rows, :, steps] = F.scaled_dot_product_attention(
                q[rows, :, steps].unsqueeze(2).contiguous(),
                k[rows[:, None], :, seen].transpose(1, 2).contiguous(),
                v[rows[:, None], :, seen].transpose(1, 2).contiguous(),
                enable_gqa=enable_gqa,
                scale=scale,
            )[:, :, 0]
    return out


def causal_mask(batch: int, time: int, device: torch.device | str) -> torch.Tensor:
    """(batch, time, time) bool: token t sees tokens 0..t (an expanded view, not a copy)."""
    return torch.ones(time, time, dtype=torch.bool, device=device).tril().expand(batch, -1, -1)


def repeat_kv(x: torch.Tensor, repeat: int) -> torch.Tensor:
    """(batch, n_kv_heads, keys, head_dim) -> (batch, n_kv_heads * repeat, keys, head_dim).

    kv head j serves query heads j * repeat .. (j + 1) * repeat - 1, as in HF. An expand and
    a reshape, unlike repeat_interleave, never needs the output size from the device.
    """
    batch, heads, keys, head_dim = x.shape
    x = x[:, :, None].expand(batch, heads, repeat, keys, head_dim)
    return x.reshape(batch, heads * repeat, keys, head_dim)


def rope_cos_sin(
    positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin: (batch, 1, time, head_dim) for positions (batch, time), sin with its first
    half negated (what `apply_rope` multiplies).

    Frequency i (of head_dim / 2) is theta ** (-2i / head_dim); both halves of a head
    share it (HF layout). Computed in float32 on the fly, so any position works,
    including the repeated depths of a token tree.
    """
    half = torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32)
    inv_freq = 1.0 / theta ** (half / head_dim)
    angles = positions[:, None, :, None].float() * inv_freq  # (batch, 1, time, head_dim / 2)
    sin = angles.sin()
    cos = torch.cat((angles, angles), dim=-1).cos()
    return cos.to(dtype), torch.cat((-sin, sin), dim=-1).to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (x_i, x_{i + head_dim/2}) pairs: x * cos + rotate_half(x) * sin (HF's), with
    `rope_cos_sin`'s sin negated in its first half so that rotate_half is a roll: the
    same bits (negating is exact) in four calls instead of six."""
    return x * cos + x.roll(x.shape[-1] // 2, -1) * sin


def cached_attention_mask(step: CacheStep, mask: torch.Tensor | None) -> torch.Tensor:
    """Mask over the cache, (batch, 1, time, step.kv_len) bool.

    Key position j of batch row b is visible to query t when j is committed
    (j < starts[b]) or when it is new token u = j - starts[b] and mask[b, t, u].

    Example: starts = [2], time = 2, causal mask -> [[T, T, T, F], [T, T, T, T]].
    """
    batch, time = step.write_positions.shape
    device = step.starts.device
    if mask is None:
        mask = causal_mask(batch, time, device)
    keys = torch.arange(step.kv_len, device=device)
    full = (keys < step.starts[:, None]).unsqueeze(1).expand(batch, time, -1).clone()
    full.scatter_(2, step.write_positions[:, None, :].expand(batch, time, time), mask)
    return full[:, None]


def window_mask(
    mask: torch.Tensor | None, queries: torch.Tensor, keys: torch.Tensor, window: int
) -> torch.Tensor:
    """`mask` (batch, 1, time, kv) bool, or None for causal over the new tokens alone,
    narrowed to keys less than `window` positions behind their query: key j stays visible
    to query t when queries[b, t] - keys[b, j] < window (HF's sliding window).

    queries: (batch, time) token positions; keys: (batch, kv) token positions of the keys
    (a cache row's entries are not at their token's position once a tree was committed).
    """
    if mask is None:
        mask = causal_mask(*queries.shape, queries.device)[:, None]
    near = (queries[:, :, None] - keys[:, None, :]) < window  # (batch, time, kv)
    return mask & near[:, None]


def ring_mask(mask: torch.Tensor, window: WindowStep) -> torch.Tensor:
    """`mask` (batch, 1, time, kv_len) over whole cache rows, as the columns a ring's
    read gives (`WindowStep.columns`); ValueError when a key the window lets a query see
    is no longer in the ring (a pass, rollback or tree deeper than the ring's slack)."""
    batch, _, time, _ = mask.shape
    columns = window.columns.clamp_min(0)[:, None, None, :].expand(batch, 1, time, -1)
    narrowed = mask.gather(3, columns) & window.valid[:, None, None, :]
    if int(narrowed.sum()) != int(mask.sum()):
        raise ValueError(
            "cache: a key inside the sliding window has left the ring that holds it; "
            "create the cache with a larger window_slack"
        )
    return narrowed
