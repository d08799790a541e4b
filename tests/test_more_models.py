"""Transformers that are not Hugging Face causal LMs, exact at N = 2 and 4 (output and every
gradient, fp32, gloo processes), with their forward collectives counted.

- ``nn.TransformerEncoder`` (``nn.MultiheadAttention`` inside) with a padding mask;
- a Llama-style block written as torchtitan and litgpt write theirs: RoPE by complex
  multiplication (``view_as_complex(x.reshape(..., -1, 2)) * freqs_cis``, ``view_as_real``) and
  grouped-query attention with k/v repeated by ``repeat_interleave`` (a faithful small
  reproduction: torchtitan and litgpt are not test dependencies; ``benchmarks/model_sweep.py``
  runs the libraries' own models).

Megatron's plan for the Llama-style blocks: one all-reduce per attention block and one per MLP
block in forward, no all-gather (the input and output are the blocks' hidden states).
"""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from autotp.verify import Case, verify

TOL = 1e-5
DIM, HEADS, KV_HEADS, LAYERS = 64, 8, 4, 2


def encoder():
    layer = nn.TransformerEncoderLayer(DIM, 4, 128, dropout=0.0, batch_first=True)
    return nn.TransformerEncoder(layer, LAYERS, enable_nested_tensor=False)


def encoder_inputs(batch, seq, seed):
    g = torch.Generator().manual_seed(seed)
    pad = torch.zeros(batch, seq, dtype=torch.bool)
    pad[0, seq // 2:] = True                       # the first sequence is half padding
    return (torch.randn(batch, seq, DIM, generator=g),), {"src_key_padding_mask": pad}


def rope_cache(head_dim: int, seq: int) -> torch.Tensor:
    freqs = 1.0 / (10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    return torch.polar(torch.ones(seq, head_dim // 2), torch.outer(torch.arange(seq).float(), freqs))


class ComplexRoPEGQA(nn.Module):
    """Attention as torchtitan's Llama 3 (complex RoPE) with litgpt's k/v repeat."""

    def __init__(self):
        super().__init__()
        self.head_dim = DIM // HEADS
        self.wq = nn.Linear(DIM, HEADS * self.head_dim, bias=False)
        self.wk = nn.Linear(DIM, KV_HEADS * self.head_dim, bias=False)
        self.wv = nn.Linear(DIM, KV_HEADS * self.head_dim, bias=False)
        self.wo = nn.Linear(HEADS * self.head_dim, DIM, bias=False)
        self.register_buffer("freqs_cis", rope_cache(self.head_dim, 64), persistent=False)

    @staticmethod
    def rotary(x, freqs_cis):                      # (B, T, H, hd), freqs (T, hd/2) complex
        x_ = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
        return torch.view_as_real(x_ * freqs_cis[:, None, :]).flatten(3).type_as(x)

    def forward(self, x):
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, HEADS, self.head_dim)
        k = self.wk(x).view(B, T, KV_HEADS, self.head_dim)
        v = self.wv(x).view(B, T, KV_HEADS, self.head_dim)
        freqs = self.freqs_cis[:T]
        q, k = self.rotary(q, freqs), self.rotary(k, freqs)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)   # (B, H|KV, T, hd)
        k = k.repeat_interleave(HEADS // KV_HEADS, dim=1)                    # (B, H, T, hd)
        v = v.repeat_interleave(HEADS // KV_HEADS, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=1 / math.sqrt(self.head_dim))
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.attention_norm, self.ffn_norm = nn.RMSNorm(DIM), nn.RMSNorm(DIM)
        self.attention = ComplexRoPEGQA()
        self.w1, self.w3 = nn.Linear(DIM, 128, bias=False), nn.Linear(DIM, 128, bias=False)
        self.w2 = nn.Linear(128, DIM, bias=False)

    def forward(self, x):
        h = x + self.attention(self.attention_norm(x))
        y = self.ffn_norm(h)
        return h + self.w2(F.silu(self.w1(y)) * self.w3(y))


class RoPEGQAStack(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(Block() for _ in range(LAYERS))

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def hidden_inputs(batch, seq, seed):
    return (torch.randn(batch, seq, DIM, generator=torch.Generator().manual_seed(seed)),), {}


CASES = [Case("encoder", encoder, inputs=encoder_inputs, other_shapes=((3, 6),)),
         Case("rope_gqa", RoPEGQAStack, inputs=hidden_inputs, other_shapes=((3, 6),))]


@pytest.fixture(scope="module", params=[2, 4])
def results(request):
    per_rank = verify(CASES, request.param, timeout_s=180)
    return request.param, {c.name: [per_rank[r][i] for r in range(request.param)] for i, c in enumerate(CASES)}


@pytest.mark.parametrize("name", [c.name for c in CASES])
def test_output_and_every_gradient_match_one_device(results, name):
    world, by_name = results
    for rank, r in enumerate(by_name[name]):
        assert not r.error, f"{name} N={world} rank {rank}:\n{r.error}"
        assert r.logits_err <= TOL and r.grad_err <= TOL and r.other_shape_err <= TOL, (
            f"{name} N={world} rank {rank}: output {r.logits_err:.1e}, gradient {r.grad_err:.1e} ({r.worst_grad}), "
            f"other shape {r.other_shape_err:.1e}")


def test_complex_rope_and_repeated_kv_get_megatrons_plan(results):
    """2 all-reduces per layer in forward and nothing else; every projection split."""
    world, by_name = results
    r = by_name["rope_gqa"][0]
    assert r.forward_counts == {"all_reduce": 2 * LAYERS}, r.summary
    for name, p in r.placements.items():
        if name.endswith(("wq.weight", "wk.weight", "wv.weight", "w1.weight", "w3.weight")):
            assert p == "S(0)", (name, p)
        elif name.endswith(("wo.weight", "w2.weight")):
            assert p == "S(1)", (name, p)


def test_transformer_encoder_with_padding_mask_counts(results):
    """Today's plan for ``nn.MultiheadAttention``: the MLP is Megatron's (one all-reduce per layer);
    the packed ``in_proj`` output is gathered and attention runs replicated, because its view merges
    batch and heads into one dim (``(T, B*H, hd)``) and a shard under the symbolic batch is not
    offered.  This pins the count so a change shows; Megatron's would be 2 all-reduces per layer."""
    world, by_name = results
    counts = by_name["encoder"][0].forward_counts
    assert counts.get("all_reduce", 0) >= LAYERS
    assert sum(counts.values()) <= 3 * LAYERS, counts


def test_transformer_without_tgt_is_causal_names_the_line_and_the_way_out():
    """``nn.Transformer`` given a causal ``tgt_mask`` but no ``tgt_is_causal`` reads the mask's values
    (``_detect_is_causal_mask``), which export cannot trace; the error says where and what to pass."""
    import autotp
    model = nn.Transformer(32, 4, 1, 1, 64, dropout=0.0, batch_first=True)
    src, tgt = torch.randn(2, 8, 32), torch.randn(2, 6, 32)
    mask = nn.Transformer.generate_square_subsequent_mask(6)
    with pytest.raises(autotp.AutoTPError) as err:
        autotp.plan(model, (src, tgt), {"tgt_mask": mask}, world_size=2)
    text = str(err.value)
    assert "transformer.py:" in text and "in _detect_is_causal_mask" in text and "pass tgt_is_causal=True" in text
    plan = autotp.plan(model, (src, tgt), {"tgt_mask": mask, "tgt_is_causal": True}, world_size=2)
    assert plan.counts()["forward"]["all_reduce"] >= 2
