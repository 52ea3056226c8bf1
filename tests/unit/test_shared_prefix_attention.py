"""The shared-prefix attention mask, three ways: a dense mask from its definition, the query /
key-value segment layout given to Transformer Engine (emulated here with per-segment
bottom-right causal attention), and FlexAttention's block mask (forward, CPU). No process
groups needed."""

import pytest
import torch
import torch.nn.functional as F

from megatron_solopo.model.attention import te_shared_prefix_layout

# Three segments: shared (prefix 5, chosen branch to 9, padded 16), unshared (8), shared with a
# one-token prefix.
CU = torch.tensor([0, 16, 24, 32], dtype=torch.int32)
BOUNDS = torch.tensor([[5, 9], [8, 8], [1, 4]], dtype=torch.int32)


def dense_mask(cu, bounds):
    total = int(cu[-1])
    allowed = torch.zeros(total, total, dtype=torch.bool)
    for (start, end), (a, b) in zip(zip(cu[:-1].tolist(), cu[1:].tolist()), bounds.tolist()):
        i = torch.arange(end - start)[:, None]
        j = torch.arange(end - start)[None, :]
        allowed[start:end, start:end] = (j <= i) & ~((j >= a) & (j < b) & (i >= b))
    return allowed


def qkv(total, heads=2, dim=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(1, heads, total, dim, generator=gen, dtype=torch.float64) for _ in range(3)]


def test_mask_definition():
    allowed = dense_mask(CU, BOUNDS)
    # rejected branch (offset 9..15 of segment 0) sees the prefix 0..4 and itself, not 5..8
    assert allowed[9, :5].all() and not allowed[9, 5:9].any() and allowed[9, 9]
    assert allowed[8, :9].all()  # the chosen branch is plain causal
    assert not allowed[16:24, :16].any()  # segments never see each other
    assert torch.equal(allowed[16:24, 16:24], torch.ones(8, 8, dtype=torch.bool).tril())


def test_transformer_engine_layout_is_the_mask():
    q, k, v = qkv(int(CU[-1]))
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=dense_mask(CU, BOUNDS))
    layout = te_shared_prefix_layout(CU, BOUNDS, torch.device("cpu"))
    kk, vv = k[:, :, layout.kv_index], v[:, :, layout.kv_index]
    assert layout.cu_seqlens_q.numel() == layout.cu_seqlens_kv.numel() == 6
    outs = []
    for index in range(layout.cu_seqlens_q.numel() - 1):
        qs, qe = layout.cu_seqlens_q[index:index + 2].tolist()
        ks, ke = layout.cu_seqlens_kv[index:index + 2].tolist()
        lq, lk = qe - qs, ke - ks
        bottom_right = torch.arange(lk)[None, :] <= torch.arange(lq)[:, None] + (lk - lq)
        outs.append(F.scaled_dot_product_attention(q[:, :, qs:qe], kk[:, :, ks:ke],
                                                   vv[:, :, ks:ke], attn_mask=bottom_right))
    torch.testing.assert_close(torch.cat(outs, dim=2), expected)
    assert layout.max_seqlen_q == 9 and layout.max_seqlen_kv == 5 + 7


@pytest.mark.parametrize("cp", [1, 2])
def test_flex_block_mask_is_the_mask(cp):
    pytest.importorskip("torch.nn.attention.flex_attention")
    from torch.nn.attention.flex_attention import flex_attention

    from megatron_solopo.model.attention import packed_block_mask
    from megatron_solopo.parallel import context_parallel as cpar

    q, k, v = (t.float() for t in qkv(int(CU[-1])))
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=dense_mask(CU, BOUNDS))
    for rank in range(cp):
        index = cpar.zigzag_indices(CU, cp, rank) if cp > 1 else torch.arange(int(CU[-1]))
        mask = packed_block_mask(CU, BOUNDS, cp, rank, torch.device("cpu"))
        out = flex_attention(q[:, :, index], k, v, block_mask=mask)
        torch.testing.assert_close(out, expected[:, :, index], rtol=1e-5, atol=1e-5)
