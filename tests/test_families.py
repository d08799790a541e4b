"""Families no rule was written for: the plan comes from the graph, and it is exact.

Each brings something the public test set does not: Falcon (multi-query fused qkv, parallel
attention + MLP, ``x @ W.T``), Phi-3 (fused qkv and gate_up), GPT-NeoX (per-head interleaved
fused qkv, partial rotary), Bloom (ALiBi), Gemma-3 (q/k norms, sliding window), MPT, OPT
(offset positions), GPT-BigCode (multi-query, unequal qkv split), OLMoE and Qwen3-MoE;
DeepSeek-V3 (latent attention: k written into a slice of a fresh buffer, an in-place write the
graph's edges do not show until capture functionalizes it; group-limited routing with
``scatter_``), GLM-MoE-DSA (an indexer under ``torch.no_grad()``) and AFMoE (views the
attention output's transpose, valid only in SDPA's output layout).  ``benchmarks/model_zoo.py``
runs every family transformers ships.
"""
from autotp.verify import Case, HFModel, verify

TOL = 1e-5
BASE = dict(pad_token_id=0, vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2)
FAMILIES = {
    "falcon": dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4),
    "phi3": dict(BASE),
    "gpt_neox": dict(BASE),
    "bloom": dict(vocab_size=128, hidden_size=64, n_layer=2, n_head=4),
    "gemma3_text": dict(BASE, head_dim=16),
    "mpt": dict(vocab_size=128, d_model=64, n_layers=2, n_heads=4),
    "opt": dict(vocab_size=128, hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                word_embed_proj_dim=64, pad_token_id=0, dropout=0.0, attention_dropout=0.0),
    "gpt_bigcode": dict(vocab_size=128, n_embd=64, n_layer=2, n_head=4, resid_pdrop=0.0, embd_pdrop=0.0,
                        attn_pdrop=0.0),
    "olmoe": dict(BASE, num_experts=4, num_experts_per_tok=2),
    "qwen3_moe": dict(BASE, head_dim=16, moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2),
    "deepseek_v3": dict(BASE, num_key_value_heads=4, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                        n_shared_experts=1, first_k_dense_replace=1, n_group=1, topk_group=1, q_lora_rank=32,
                        kv_lora_rank=32, qk_rope_head_dim=16, qk_nope_head_dim=8, v_head_dim=16),
    "glm_moe_dsa": dict(BASE, num_key_value_heads=4, n_routed_experts=4, num_experts_per_tok=2,
                        moe_intermediate_size=32, n_shared_experts=1, first_k_dense_replace=1, n_group=1,
                        topk_group=1, q_lora_rank=32, kv_lora_rank=32, qk_rope_head_dim=16, qk_nope_head_dim=8,
                        v_head_dim=16),
    "afmoe": dict(BASE, head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32),
}


def test_unseen_families_match_one_device_at_two_ranks():
    _check(verify([Case(n, HFModel(dict(model_type=n, **c))) for n, c in FAMILIES.items()], 2, timeout_s=300))


def test_unseen_families_with_sequence_parallelism():
    """The same families with ``sequence_parallel=True``: fused projections, parallel attention +
    MLP, ALiBi, post-norms and MoE blocks all find a sequence-split plan, and it is exact."""
    cases = [Case(n, HFModel(dict(model_type=n, **c)), kwargs={"sequence_parallel": True}, other_shapes=((3, 4),))
             for n, c in FAMILIES.items()]
    _check(verify(cases, 2, timeout_s=300))


def _check(per_rank) -> None:
    bad = []
    for rank, res in enumerate(per_rank):
        for r in res:
            if r.error or r.logits_err > TOL or r.grad_err > TOL or r.other_shape_err > TOL:
                bad.append(f"{r.name} rank {rank}: logits {r.logits_err:.1e} grad {r.grad_err:.1e} "
                           f"({r.worst_grad}) {r.error.strip().splitlines()[-1] if r.error else ''}")
    assert not bad, "\n".join(bad)
