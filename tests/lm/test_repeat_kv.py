"""`lm.model.repeat_kv`, the grouped-query path `Attention` takes on CUDA, run on the CPU:
repeating the kv heads and attending with plain SDPA must equal SDPA's own enable_gqa
(the CPU path), and the repeated heads must come in HF's order."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lm.model import repeat_kv


def test_repeat_kv_puts_each_kv_head_before_the_next_as_hf_does():
    # Two kv heads, one key of one value each: head 0 holds 10, head 1 holds 20.
    x = torch.tensor([10.0, 20.0]).view(1, 2, 1, 1)
    # kv head j serves query heads j * 3 .. j * 3 + 2.
    assert repeat_kv(x, 3).flatten().tolist() == [10.0, 10.0, 10.0, 20.0, 20.0, 20.0]
    k = torch.randn(2, 2, 5, 16)
    assert torch.equal(repeat_kv(k, 3), torch.repeat_interleave(k, 3, dim=1))


def test_repeat_kv_then_sdpa_equals_sdpa_with_enable_gqa():
    torch.manual_seed(0)
    q = torch.randn(1, 6, 5, 16)
    k, v = torch.randn(1, 2, 5, 16), torch.randn(1, 2, 5, 16)
    # Causal, with a few more keys hidden; every query still sees itself.
    mask = torch.ones(5, 5, dtype=torch.bool).tril()
    mask[3, 1] = mask[4, 0] = mask[4, 2] = False
    mask = mask.view(1, 1, 5, 5)
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    got = F.scaled_dot_product_attention(q, repeat_kv(k, 3), repeat_kv(v, 3), attn_mask=mask)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    # The mask matters: without it the outputs differ.
    unmasked = F.scaled_dot_product_attention(q, repeat_kv(k, 3), repeat_kv(v, 3))
    assert not torch.allclose(unmasked, expected)
