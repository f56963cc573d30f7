"""Tree-masked attention through FlexAttention (`torch.nn.attention.flex_attention`).

SDPA takes a tree pass's mask as a dense boolean tensor, and on CUDA a boolean mask keeps
it off the flash kernels: the memory-efficient or math kernel then reads the mask for every
head. FlexAttention instead takes the rule that makes the mask, here "key j of row b is
visible to query t when j is committed (j < starts[b]) or j is the new token u = j -
starts[b] and tree[b, t, u]" (and, on a sliding-window layer, when the key is less than
`window` positions behind the query). `create_block_mask` evaluates the rule once per pass
into a block-sparse mask shared by every head and layer of that kind; the kernel skips the
blocks no query sees and applies the rule inside the partial ones.

On CUDA both the block-mask construction and the kernel are compiled (Triton); elsewhere
they run eagerly, a slow reference used by the CPU tests to check the rule against SDPA.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache

import torch
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention


def tree_block_mask(
    starts: torch.Tensor,
    tree: torch.Tensor,
    kv_len: int,
    *,
    window: tuple[torch.Tensor, torch.Tensor, int] | None = None,
) -> BlockMask:
    """The block mask of a cached pass: starts (batch,) committed entries per row, tree
    (batch, time, time) bool over the new tokens ([b, t, u]: token t sees new token u);
    window: (query positions (batch, time), key positions (batch, kv_len), width) to
    narrow it for a sliding-window layer."""
    batch, time, _ = tree.shape

    def visible(
        b: torch.Tensor, h: torch.Tensor, q: torch.Tensor, kv: torch.Tensor
    ) -> torch.Tensor:
        # Sizes read from the captured tensors, not closed over as Python ints, so the
        # compiled builder does not specialise on every tree size.
        last = tree.shape[2] - 1
        new = kv - starts[b]
        seen = (new < 0) | ((new <= last) & tree[b, q, new.clamp(0, last)])
        if window is None:
            return seen
        queries, keys, width = window
        return seen & (queries[b, q] - keys[b, kv.clamp(max=keys.shape[1] - 1)] < width)

    build = _builder(tree.device.type)
    return build(visible, batch, None, time, kv_len, device=tree.device)


def flex_attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_mask: BlockMask,
    scale: float | None,
) -> torch.Tensor:
    """Attention of q (batch, heads, time, d) over k, v (batch, kv_heads, keys, d) under
    `block_mask`; kv_heads divides heads. Out: (batch, heads, time, d)."""
    kernel = _kernel(q.device.type)
    return kernel(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1])


@cache
def _builder(device_type: str) -> Callable[..., BlockMask]:
    """create_block_mask, compiled once per process on CUDA (dynamic shapes)."""
    if device_type == "cuda":
        return torch.compile(create_block_mask, dynamic=True)
    return create_block_mask


@cache
def _kernel(device_type: str) -> Callable[..., torch.Tensor]:
    """flex_attention, compiled once per process on CUDA (dynamic shapes: trees and
    contexts change size every pass)."""
    if device_type == "cuda":
        return torch.compile(flex_attention, dynamic=True)
    return flex_attention
