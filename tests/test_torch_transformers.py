"""PyTorch's own transformer modules get Megatron's plan, exactly.

``nn.TransformerEncoder`` (``nn.MultiheadAttention`` inside, the decomposed path that export
traces in training and in eval) with a padding mask, ``batch_first`` both ways, at N = 2 and 4
(gloo processes, fp32):

- output and every parameter gradient equal the unsharded model's;
- forward: one all-reduce per attention block (after ``out_proj``) and one per MLP block (after
  ``linear2``), nothing else — the packed ``in_proj`` is column-parallel (``S(0)x3``: each rank
  holds its heads' rows of q, k and v), attention runs on the local heads;
- this rank runs 1/N of the forward matmul and attention FLOPs.

Plan-only checks: ``nn.Transformer`` given a causal mask without ``tgt_is_causal`` says which
flag to pass and where; a note about a size export fixed names the dim neutrally.
"""
import copy
import functools

import pytest
import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

import autotp
from autotp.verify import Case, run_case
from ranks import case, run_cases

TOL = 1e-5
DIM, HEADS, FFN, LAYERS = 48, 12, 96, 2          # 12 heads: 6 per rank at N=2, 3 at N=4


def encoder(batch_first: bool) -> nn.Module:
    layer = nn.TransformerEncoderLayer(DIM, HEADS, FFN, dropout=0.0, batch_first=batch_first)
    return nn.TransformerEncoder(layer, LAYERS, enable_nested_tensor=False)


def encoder_inputs(batch_first: bool, batch: int, seq: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    pad = torch.zeros(batch, seq, dtype=torch.bool)
    pad[0, seq // 2:] = True                       # the first sequence is half padding
    x = torch.randn(batch, seq, DIM, generator=g)
    return (x if batch_first else x.transpose(0, 1).contiguous(),), {"src_key_padding_mask": pad}


def _attention_flops(q, k, v, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(q, k, v)


def _forward_flops(model, args, kwargs) -> int:
    """Matmul and attention FLOPs of one forward (autotp's attention op counted as SDPA)."""
    mapping = {torch.ops.autotp.attention.default: _attention_flops}
    with FlopCounterMode(display=False, custom_mapping=mapping) as counter, torch.no_grad():
        model(*args, **kwargs)
    return counter.get_total_flops()


def _flop_fraction(batch_first: bool) -> float:
    torch.manual_seed(0)
    model = encoder(batch_first)
    reference = copy.deepcopy(model)
    args, kwargs = encoder_inputs(batch_first, 2, 8, 1)
    pmodel = autotp.parallelize(model, args, kwargs)
    return _forward_flops(pmodel, args, kwargs) / _forward_flops(reference, args, kwargs)


def _cases():
    import torch.distributed as dist
    rank, world = dist.get_rank(), dist.get_world_size()
    out = {}
    for batch_first in (True, False):
        c = Case(f"encoder_batch_first={batch_first}", functools.partial(encoder, batch_first),
                 inputs=functools.partial(encoder_inputs, batch_first), other_shapes=((3, 6),))
        out[c.name] = functools.partial(run_case, c, rank, world)
    out["flops"] = functools.partial(_flop_fraction, True)
    return out


@pytest.fixture(scope="module", params=[2, 4], ids=lambda w: f"N{w}")
def results(request):
    return request.param, run_cases(_cases, request.param, timeout_s=180)


@pytest.mark.parametrize("batch_first", [True, False])
def test_encoder_matches_one_device_with_megatrons_collectives(results, batch_first):
    world, per_rank = results
    for rank, r in enumerate(case(per_rank, f"encoder_batch_first={batch_first}")):
        assert not r.error, f"N={world} rank {rank}:\n{r.error}"
        assert r.logits_err <= TOL and r.grad_err <= TOL and r.other_shape_err <= TOL, (
            f"N={world} rank {rank}: output {r.logits_err:.1e}, gradient {r.grad_err:.1e} ({r.worst_grad}), "
            f"other shape {r.other_shape_err:.1e}")
        # out_proj and linear2 end in one all-reduce each; no all-gather anywhere in forward
        assert r.forward_counts == {"all_reduce": 2 * LAYERS}, r.summary
    placements = case(per_rank, f"encoder_batch_first={batch_first}")[0].placements
    for name, p in placements.items():
        if name.endswith("in_proj_weight"):
            assert p == "S(0)x3", (name, p)           # [q|k|v] rows, each split by heads
        elif name.endswith(("in_proj_bias", "linear1.weight", "linear1.bias")):
            assert p in ("S(0)x3", "S(0)"), (name, p)
        elif name.endswith(("out_proj.weight", "linear2.weight")):
            assert p == "S(1)", (name, p)


def test_each_rank_runs_a_1_over_n_share_of_the_flops(results):
    world, per_rank = results
    for rank, fraction in enumerate(case(per_rank, "flops")):
        assert abs(fraction - 1 / world) <= 0.01, f"N={world} rank {rank}: {fraction:.3f} of the FLOPs"


def test_merged_batch_heads_view_is_folded():
    """``(T, B, E) -> (T, B*H, hd) -> (B*H, T, hd) -> (B, H, T, hd)`` is captured as a view to
    ``(T, B, H, hd)`` and a permute: no dim merges the batch with the heads, and the graph stays
    right at another batch size."""
    from autotp.capture import capture

    class Heads(nn.Module):
        def forward(self, x):
            t, b, _ = x.shape
            return x.view(t, b * 4, 8).transpose(0, 1).view(b, 4, t, 8) * 2

    captured = capture(Heads(), (torch.randn(5, 3, 32),))
    shapes = [tuple(n.meta["val"].shape) for n in captured.gm.graph.nodes if "val" in n.meta
              and isinstance(n.meta["val"], torch.Tensor)]
    assert not any(len(s) == 3 and s[0] != 5 and s[1] == 5 for s in shapes), shapes   # no (B*H, T, hd)
    x = torch.randn(7, 2, 32)
    torch.testing.assert_close(captured.gm(x)[0], Heads()(x), rtol=0, atol=0)


def test_transformer_without_tgt_is_causal_names_the_flag_and_the_line():
    model = nn.Transformer(32, 4, 1, 1, 64, dropout=0.0, batch_first=True)
    src, tgt = torch.randn(2, 8, 32), torch.randn(2, 6, 32)
    mask = nn.Transformer.generate_square_subsequent_mask
    with pytest.raises(autotp.AutoTPError) as err:
        autotp.plan(model, (src, tgt), {"tgt_mask": mask(6)}, world_size=2)
    text = str(err.value)
    assert "in _detect_is_causal_mask" in text and "pass tgt_is_causal=True" in text, text
    assert "tgt_is_causal = _detect_is_causal_mask(tgt_mask, tgt_is_causal, seq_len)" in text, text
    # the encoder's mask: the flag nn.Transformer passes on as the encoder's is_causal
    with pytest.raises(autotp.AutoTPError) as err:
        autotp.plan(model, (src, tgt), {"tgt_mask": mask(6), "tgt_is_causal": True, "src_mask": mask(8)},
                    world_size=2)
    assert "pass src_is_causal=True" in str(err.value) and "is_causal=src_is_causal" in str(err.value)


def test_fixed_dim_note_names_the_dim_neutrally():
    """Dim 1 of an image is its channels: the note says "dim 1", not a role it does not have."""
    class Patches(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.proj = nn.Conv2d(3, 32, 4, 4), nn.Linear(32, 64)

        def forward(self, pixel_values):
            return self.proj(self.conv(pixel_values).flatten(2).transpose(1, 2))

    plan = autotp.plan(Patches(), (torch.randn(2, 3, 8, 8),), world_size=2)
    note = next(n for n in plan.notes if "pixel_values" in n)
    assert "fixed dim 1 of `pixel_values`" in note and "seq" not in note, note


def test_size_names_in_notes_say_seq_only_for_token_ids():
    """A symbol of dim 1 is `seq` in a note only when it is dim 1 of token ids; of a float input
    (an encoder's (T, B, E) hidden states) it is named by where it is."""
    from autotp.capture import capture
    from autotp.plan import _size_name

    def name_of_dim1(model, x):
        captured = capture(model, (x,))
        size = next(n for n in captured.gm.graph.nodes if n.op == "placeholder"
                    and n.name in captured.user_inputs).meta["val"].shape[1]
        return _size_name(captured, size.node.expr)

    ids = torch.randint(0, 16, (2, 6))
    assert name_of_dim1(nn.Sequential(nn.Embedding(16, 8), nn.Linear(8, 8)), ids) == "`seq`"
    assert name_of_dim1(nn.Linear(8, 8), torch.randn(6, 2, 8)) == "dim 1 of `input`"
