"""Every registered rule proved on numbers (``autotp.conformance``).

For each op in the rule table: its OpInfo samples (a few, float32, small) and samples with the
shapes the model zoo produces — ``(B, T, d)`` activations, ``(B, H, T, hd)`` attention heads,
fused ``[q|k|v]`` projections, stacked expert weights — at world sizes 2, 3 and 4.  Every
strategy the rule offers is run on simulated ranks and compared with the op on the full inputs
(backward too, for float outputs).  A failing strategy is a rule bug: fix the rule or stop
offering the strategy (a fix too big for now: ``pytest.mark.xfail`` on that op, naming the
strategy and the reason).
"""
from __future__ import annotations

import pytest
import torch

from autotp.conformance import Conformance, check_rule, opinfo_samples
from autotp.passes.rules import RULES
from autotp.placement import P, S

aten = torch.ops.aten
WORLDS = (2, 3, 4)


def _g(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype)


def _zoo() -> dict:
    """op -> list of (args, kwargs) with model-zoo shapes; sizes divide by 2, 3 and 4 where a
    model's would (heads 12, hidden 48, sequence 12) and only by 2 and 4 where not (8, 64)."""
    torch.manual_seed(0)
    x, x3 = _g(2, 8, 64), _g(2, 12, 48)                  # (B, T, d)
    h, h3 = _g(4, 2, 8, 16), _g(2, 12, 6, 8)            # (B, H, T, hd), (B, T, H, hd)
    qkv = _g(2, 8, 192)                                   # fused [q|k|v]
    w, w3 = _g(32, 64), _g(24, 48)                        # (out, in)
    mask = torch.rand(2, 8, 64) > 0.5
    bools = (mask, torch.rand(2, 8, 64) > 0.5)
    ids = torch.randint(0, 64, (2, 8))
    logits, target = _g(16, 64), torch.randint(0, 64, (16,))
    pos = torch.randn(2, 8, 64).abs() + 0.1
    unary = [((x,), {}), ((x3,), {})]
    binary = [((x, x.flip(0)), {}), ((x, _g(64)), {}), ((x3, _g(2, 12, 1)), {})]
    z = {}
    for op in (aten.silu.default, aten.gelu.default, aten.relu.default, aten.tanh.default, aten.neg.default,
               aten.exp.default, aten.clone.default, aten.alias.default, aten.contiguous.default, aten.detach.default,
               aten.lift_fresh_copy.default, aten.zeros_like.default, aten.empty_like.default, aten.ones_like.default, aten.sigmoid.default,
               aten.cos.default, aten.sin.default):
        z[op] = unary
    z[aten.rsqrt.default] = [((pos,), {})]
    for op in (aten.add.Tensor, aten.sub.Tensor, aten.mul.Tensor, aten.div.Tensor, aten.copy.default,
               aten.maximum.default):
        z[op] = binary
    z[aten.type_as.default] = [((x, x.double()), {})]
    z[aten.mul.Scalar] = z[aten.div.Scalar] = [((x, 0.5), {})]
    z[aten.pow.Tensor_Scalar] = [((x, 2), {})]
    z[aten.add.Scalar] = [((x, 1.0), {})]
    z[aten.to.dtype] = [((x, torch.float64), {})]
    z[aten._to_copy.default] = [((x,), {"dtype": torch.float64})]
    z[aten.to.device] = [((x, torch.device("cpu"), torch.float64), {})]
    z[aten.to.dtype_layout] = [((x,), {"dtype": torch.float64})]
    z[aten.dropout.default] = [((x, 0.0, False), {})]
    z[aten.fill.Scalar] = z[aten.full_like.default] = [((x, 3.0), {})]
    z[aten.clamp.default] = [((x, -0.5, 0.5), {})]
    z[aten.clamp_min.default] = z[aten.clamp_max.default] = [((x, 0.1), {})]
    z[aten.triu.default] = z[aten.tril.default] = [((h, 0), {}), ((_g(4, 2, 8, 8), 1), {})]
    for op in (aten.__and__.Tensor, aten.__or__.Tensor, aten.bitwise_and.Tensor, aten.bitwise_or.Tensor,
               aten.logical_and.default, aten.logical_or.default):
        z[op] = [(bools, {})]
    z[aten.bitwise_not.default] = z[aten.logical_not.default] = [((mask,), {})]
    z[aten.masked_fill.Scalar] = [((x, mask, 0.0), {}), ((h, torch.rand(8, 16) > 0.5, -1e9), {})]
    z[aten.masked_fill.Tensor] = [((x, mask, torch.tensor(2.0)), {})]
    z[aten.where.self] = [((mask, x, x.flip(1)), {}), ((torch.rand(8, 1) > 0.5, x, 0 * x), {})]
    z[aten.where.ScalarOther] = [((mask, x, 0.0), {})]
    z[aten.where.ScalarSelf] = [((mask, 0.0, x), {})]
    # views
    z[aten.view.default] = z[aten.reshape.default] = z[aten._unsafe_view.default] = [
        ((x, [2, 8, 4, 16]), {}), ((_g(2, 8, 4, 16), [2, 8, 64]), {}), ((x, [16, 64]), {}),
        ((qkv, [2, 8, 3, 64]), {}), ((x3, [2, 12, 6, 8]), {}), ((h3, [24, 48]), {})]
    z[aten.unsqueeze.default] = [((x, 2), {}), ((x3, 0), {})]
    z[aten.squeeze.dim] = [((_g(2, 8, 1, 64), 2), {}), ((_g(4, 2, 8), 1), {})]    # 2nd: no-op globally
    z[aten.squeeze.dims] = [((_g(2, 8, 1, 64), [2]), {}), ((_g(4, 2, 1), [1, 2]), {})]
    z[aten.squeeze.default] = [((_g(2, 8, 1, 64),), {})]
    z[aten.flatten.using_ints] = [((h, 0, 1), {}), ((h3, 2, 3), {})]
    z[aten.unflatten.int] = [((x, 2, [4, 16]), {}), ((x3, 2, [6, 8]), {})]
    z[aten.view_as.default] = z[aten.reshape_as.default] = [((x, _g(2, 8, 4, 16)), {})]
    z[aten.transpose.int] = [((h, 1, 2), {}), ((h3, 1, 2), {})]
    z[aten.t.default] = [((w, ), {})]
    z[aten.numpy_T.default] = [((x,), {})]
    z[aten.permute.default] = [((h, [0, 2, 1, 3]), {}), ((h3, [0, 2, 1, 3]), {})]
    z[aten.slice.Tensor] = [((x, 1, 0, 4), {}), ((x, 2, 0, 64), {}), ((x3, 2, 16, 32), {})]
    z[aten.select.int] = [((x, 1, 3), {}), ((h3, 2, 0), {})]
    z[aten.expand.default] = [((_g(2, 8, 1, 16), [2, 8, 4, 16]), {}), ((_g(8, 64), [2, 8, 64]), {}),
                              ((_g(2, 1, 12, 8), [2, 6, 12, 8]), {})]
    z[aten.split.Tensor] = [((x, 16, 2), {}), ((qkv, 64, -1), {}), ((x3, 6, 1), {})]
    z[aten.split_with_sizes.default] = [((x, [32, 16, 16], 2), {}), ((_g(2, 8, 96), [64, 32], -1), {})]
    z[aten.unbind.int] = [((h, 1), {}), ((_g(2, 3, 12), 1), {})]
    z[aten.chunk.default] = [((x, 2, 2), {}), ((qkv, 3, -1), {}), ((x3, 3, 1), {})]
    z[aten.cat.default] = [(([x, x.flip(0)], 2), {}), (([x, x], 1), {}), (([x3, _g(2, 12, 24)], -1), {})]
    z[aten.stack.default] = [(([x, x.flip(0)], 1), {}), (([x3, x3], 0), {})]
    z[aten.index.Tensor] = [((_g(64, 48), [ids]), {}), ((x, [torch.tensor([1, 0])]), {})]
    z[aten.view_as_complex.default] = [((_g(2, 8, 32, 2), ), {})]
    z[aten.view_as_real.default] = [((torch.randn(2, 8, 32, dtype=torch.complex64), ), {})]
    z[aten.repeat_interleave.self_int] = [((h, 2, 1), {}), ((h3, 2, 2), {"output_size": 12}),
                                          ((x, 2), {})]
    z[aten.repeat_interleave.self_Tensor] = [((x, torch.tensor([1, 2] * 4), 1), {})]
    # repeat: counts of 1 (a shard stays), > 1 (S(d) -> S(d)xr), new leading dims, a (1, 1, d) probe per batch row
    z[aten.repeat.default] = [((x3, [1, 3, 1]), {}), ((h3, [1, 1, 2, 1]), {}), ((_g(8, 48), [2, 1, 1]), {}),
                              ((_g(1, 1, 48), [12, 1, 1]), {}), ((qkv, [1, 1, 1]), {})]
    swin = _g(2, 12, 12, 48)                              # (B, H, W, C), padded to whole windows
    z[aten.constant_pad_nd.default] = [((swin, [0, 0, 0, 1, 0, 1]), {}), ((x3, [2, 2], 1.5), {}),
                                       ((x, [0, 0, 1, -2]), {})]
    z[aten.pad.default] = [((swin, [0, 0, 0, 2, 0, 2]), {}), ((x, [0, 2], "constant", 0.5), {}),
                           ((x3, [1, 1], "reflect"), {}), ((x3, [0, 0, 1, 1], "replicate"), {}),
                           ((x3, [2, 1], "circular"), {})]
    z[aten.roll.default] = [((swin, [-2, -2], [1, 2]), {}), ((x, [3], [-1]), {}), ((x3, [5]), {})]
    # contractions
    z[aten.linear.default] = [((x, w), {}), ((x3, w3), {}), ((x, w, _g(32)), {})]
    z[aten.mm.default] = [((_g(16, 64), _g(64, 24)), {})]
    z[aten.bmm.default] = [((_g(12, 8, 16), _g(12, 16, 8)), {})]
    z[aten.matmul.default] = [((x, _g(64, 24)), {}), ((h, h.transpose(-1, -2)), {})]
    z[aten.einsum.default] = [(("bsd,nd->bsn", [x, w]), {}), (("bhqd,bhkd->bhqk", [h3, h3]), {})]
    # reductions, normalisations
    z[aten.sum.dim_IntList] = [((x, [2]), {}), ((x3, [1], True), {})]
    z[aten.sum.default] = z[aten.mean.default] = unary
    z[aten.mean.dim] = [((x, [-1], True), {}), ((h3, [1, 3]), {})]
    z[aten.amax.default] = z[aten.amin.default] = z[aten.logsumexp.default] = [((x, [2]), {}), ((x3, [1], True), {})]
    z[aten.var.correction] = z[aten.std.correction] = [((x, [2]), {"correction": 1, "keepdim": True})]
    z[aten.var_mean.correction] = [((x3, [2]), {"correction": 0})]
    z[aten.linalg_vector_norm.default] = [((x, 2, [2]), {})]
    z[aten.any.dim] = z[aten.all.dim] = [((mask, 2), {}), ((mask, 1, True), {})]
    z[aten.prod.dim_int] = [((x, 1), {})]
    z[aten._softmax.default] = z[aten._log_softmax.default] = [((x, 2, False), {}), ((h3, 1, False), {})]
    z[aten.softmax.int] = z[aten.log_softmax.int] = [((x, -1), {}), ((x3, 1), {})]
    z[aten.cumsum.default] = z[aten.cumprod.default] = [((x, 1), {}), ((x3, 2), {})]
    z[aten.argmax.default] = z[aten.argmin.default] = [((x, 2, True), {}), ((x3, 1), {})]
    z[aten.topk.default] = [((x, 4, -1), {}), ((x3, 2, 1), {})]
    z[aten.sort.default] = [((x, -1), {}), ((x3, 1), {})]
    z[aten.sort.stable] = [((x,), {"stable": True, "dim": 1})]
    # adaptive average pooling: (B, C, L) as Swin's pooler, (B, C, H, W), unbatched (C, H, W), (B, C, D, H, W)
    z[aten.adaptive_avg_pool1d.default] = [((x3.transpose(1, 2), [1]), {}), ((x, [16]), {})]
    z[aten.adaptive_avg_pool2d.default] = z[aten._adaptive_avg_pool2d.default] = [
        ((_g(2, 48, 8, 8), [1, 1]), {}), ((_g(2, 12, 6, 6), [4, 3]), {}), ((_g(12, 8, 8), [2, 2]), {})]
    z[aten.adaptive_avg_pool3d.default] = z[aten._adaptive_avg_pool3d.default] = [((_g(2, 12, 4, 4, 4), [2, 1, 3]), {})]
    z[aten.layer_norm.default] = [((x, [64], _g(64), _g(64), 1e-5), {}), ((x3, [48]), {})]
    z[aten.rms_norm.default] = [((x, [64], _g(64), 1e-6), {}), ((h3, [8]), {})]
    z[aten.cross_entropy_loss.default] = z[aten.nll_loss_nd.default] = [((logits, target), {})]
    z[aten.nll_loss.default] = [((logits.log_softmax(-1), target, None, 1, -100), {})]
    z[aten.embedding.default] = [((_g(64, 32), ids), {}), ((_g(48, 24), ids % 48, 3), {})]
    z[aten.scaled_dot_product_attention.default] = [
        ((h3.transpose(1, 2),) * 3, {}),                                  # (B, H, T, hd): 6 heads
        ((h, h, h), {"is_causal": True}),
        ((h, h, h, torch.rand(1, 1, 8, 8) > 0.2), {}),
        ((_g(2, 12, 8, 16), _g(2, 6, 8, 16), _g(2, 6, 8, 16)), {"enable_gqa": True})]
    z[aten.index_copy.default] = [((_g(2, 12, 16, 8), 2, torch.tensor([3, 0, 7]), _g(2, 12, 3, 8)), {})]
    offs = torch.tensor([4, 8, 12, 16], dtype=torch.int32)
    z[aten._grouped_mm.default] = [((_g(16, 48), _g(4, 48, 96), offs), {})]
    return z


ZOO = _zoo()
# the zoo's pointwise ops without a registration of their own (tagged pointwise in ATen)
OPS = sorted({op for op in RULES if isinstance(op, torch._ops.OpOverload)} | set(ZOO), key=str)
NOT_SIMULATED = {"autotp::attention": "lowered by lower_attention into the runtime's attention call",
                 "transformers::grouped_mm_fallback": "a transformers custom op (aten._grouped_mm is checked)"}


def test_every_rule_has_samples():
    """A registered op without zoo samples would be checked only where OpInfo happens to have it."""
    missing = [str(op) for op in RULES if isinstance(op, torch._ops.OpOverload) and op not in ZOO]
    assert missing == []
    assert set(map(str, (op for op in RULES if not isinstance(op, torch._ops.OpOverload)))) <= set(NOT_SIMULATED)


def check_op(op) -> Conformance:
    samples = ZOO.get(op, []) + opinfo_samples(op, limit=2)
    total = Conformance()
    for world in WORLDS:
        total.merge(check_rule(op, samples, world))
    return total


@pytest.mark.parametrize("op", OPS, ids=str)
def test_rule_conformance(op):
    report = check_op(op)
    assert not report.failures, "\n".join(map(str, report.failures))
    assert report.ran + sum(report.skipped.values()) > 0


def _wrong(*strategies):
    from autotp.passes.rules import Strategy, replicate_strategy
    return lambda node, ctx: [replicate_strategy(node)] + [Strategy(i, o) for i, o in strategies]


@pytest.mark.parametrize("op,sample,strategy", [
    (aten.silu.default, ((_g(2, 8, 64),), {}), ((P,), P)),                        # silu is not linear
    (aten.linear.default, ((_g(2, 8, 64), _g(32, 64)), {}), ((S(2), S(1)), S(2))),  # row-parallel is P, not S
    (aten.sum.dim_IntList, ((_g(2, 8, 64), [2]), {}), ((S(1),), S(0))),           # dim renumbered wrong
    (aten.transpose.int, ((_g(2, 8, 4, 16), 1, 2), {}), ((S(1, 2),), S(2))),      # strided lost
    (aten.view.default, ((_g(2, 8, 64), [2, 8, 4, 16]), {}), ((S(2),), S(2))),   # no localize of the shape
])
def test_harness_catches_wrong_strategies(op, sample, strategy):
    """The harness is not vacuous: a strategy that is false fails, at every world it runs."""
    report = check_rule(op, [sample], 2, rule=_wrong(strategy))
    assert report.ran == 1 and len(report.failures) == 1, report


def test_harness_catches_wrong_backward():
    """A forward that holds with a gradient that does not: a localize hook whose local op gives
    the right values but drops one input's gradient."""
    from autotp.conformance import check_backward, one_op_graph
    from autotp.passes.rules import Strategy

    def hook(node, strategy, lctx):
        node.target = _mul_detached
    graph, node, tensors = one_op_graph(aten.mul.Tensor, (_g(2, 8, 64), _g(2, 8, 64)), {})
    msg = check_backward(aten.mul.Tensor, graph, node, tensors, Strategy((S(2), S(2)), S(2), localize=hook), 2)
    assert msg is not None and "grad of input 1" in msg


def _mul_detached(a, b):
    return a * b.detach()
