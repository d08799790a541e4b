"""lower_attention: every attention of the rank-local graph becomes one ``autotp.attention`` op.

Runs after ``localize``, on the rewritten graph of one rank.  Three forms are recognised:

* ``aten.scaled_dot_product_attention`` (most Hugging Face families): the arguments map one to
  one, ``scale=None`` becomes ``1/sqrt(D)``.  Only ``dropout_p == 0`` is lowered.
* a hand-written chain (``attn_implementation="eager"``, older or unusual models)::

      matmul|bmm(q, k.transpose(-2, -1))            # scores (B, H, L_q, L_k)
        [* c | / c]...                              # scale
        [+ mask | where(keep, ., fill) | masked_fill(drop, fill)]...
        -> softmax(dim=-1) [-> cast | dropout(p=0) | clone]...
        -> matmul|bmm(., v)                         # (B, H, L_q, D)

  when every intermediate's only user is the next link (scores or weights needed elsewhere, e.g.
  returned, keep the chain).  The masks fold into one additive mask, the form SDPA takes:
  ``where(keep, s, fill)`` is ``s + where(keep, 0, fill)`` exactly when ``fill`` is ``-inf`` or
  the dtype's minimum (``s + min`` rounds back to ``min`` for any ``|s| < 2**103``), which is what
  models write; a finite fill such as ``-1e4`` stays (a fully-masked row would change).
* GQA written as ``repeat_kv`` (``unsqueeze -> expand -> reshape`` of k and v to q's heads) in
  front of either form: the op takes the un-repeated k, v and ``enable_gqa=True``, so the repeats
  are never materialised — when the repeat nodes feed only the attention and the local heads line
  up (k and v split like q, or a single replicated kv head).

A mask computed from the input *sizes* only (Hugging Face's ``sdpa_mask`` with no
``attention_mask`` given: arange, cumsum, index and compare ops on positions) becomes
``is_causal=True`` when it is exactly the causal mask — checked by evaluating its subgraph at
several (batch, seq) sizes — so the fused kernels (flash-attn, the Triton kernel) that take no
mask can run.  A mask that reads any tensor input (a padding ``attention_mask``) stays.

New nodes get the replaced node's ``stack_trace``/``nn_module_stack``, ``meta["val"]`` and
``meta["autotp_val"]``, and ``meta["autotp"] = {"placement", "lowered": backend}``; the pass ends
with localize's shape check.  What stays, and why, goes to ``ctx.notes``.  ``ctx.lower_attention
= False`` turns the pass off.
"""
from __future__ import annotations

import collections
import dataclasses
import math

import torch
import torch.fx as fx
from torch._guards import detect_fake_mode

from autotp import comm
from autotp.kernels.attention_op import select_backend
from autotp.placement import Grid, R, S, is_shard, split_factor
from autotp.passes.causal_mask import is_size_only_causal
from autotp.passes.context import PassContext, module_path
from autotp.passes.localize import check_local_shapes
from autotp.passes.rules import val

aten = torch.ops.aten
ATTENTION = torch.ops.autotp.attention.default


_MATMULS = (aten.matmul.default, aten.bmm.default)
_SOFTMAXES = (aten.softmax.int, aten._softmax.default, aten._safe_softmax.default)
_CASTS = (aten.to.dtype, aten._to_copy.default, aten.clone.default, aten.contiguous.default, aten.alias.default)
_SCALES = (aten.mul.Tensor, aten.mul.Scalar, aten.div.Tensor, aten.div.Scalar)
_WHERES = (aten.where.self, aten.where.ScalarSelf, aten.where.ScalarOther)
_FILLS = (aten.masked_fill.Scalar, aten.masked_fill.Tensor)
_SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")


@dataclasses.dataclass
class _MaskTerm:
    """One additive contribution to the mask: ``node`` itself ("add"), ``where(node, 0, fill)``
    ("keep": node True keeps the score) or ``where(node, fill, 0)`` ("drop")."""
    kind: str
    node: fx.Node
    fill: float = 0.0
    source: fx.Node | None = None          # the op of the chain it replaces (for meta)


@dataclasses.dataclass
class _Attention:
    """One recognised attention: the op's operands and the nodes it replaces."""
    output: fx.Node                        # the node whose value the op computes
    q: fx.Node
    k: fx.Node
    v: fx.Node
    attn_mask: fx.Node | None = None       # SDPA's mask, as given
    scores: fx.Node | None = None          # a chain's q @ k^T
    terms: list = dataclasses.field(default_factory=list)   # a chain's masks, in forward order
    is_causal: bool = False
    scale: float = 1.0
    enable_gqa: bool = False
    replaced: list = dataclasses.field(default_factory=list)  # erased after the rewrite, users first
    regrad: list = dataclasses.field(default_factory=list)    # (reduce_grad node, new input): moved onto k/v
    constants: list = dataclasses.field(default_factory=list)  # fill/scale constant nodes, erased if dead


def lower_attention(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    """Replace every attention that can be computed exactly by ``autotp.attention`` with it."""
    if not getattr(ctx, "lower_attention", True):
        return gm
    kept: dict[str, list[fx.Node]] = collections.defaultdict(list)      # reason -> attentions
    backends: collections.Counter = collections.Counter()
    causal = 0
    causal_masks: dict = {}       # (mask node, inverted) -> verdict: the layers share one mask
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or getattr(node, "_erased", False):
            continue
        if node.target == aten.scaled_dot_product_attention.default:
            found = _match_sdpa(node)
        elif node.target in _MATMULS:
            found = _match_chain(node)
        else:
            continue
        if isinstance(found, _Attention):
            found = _check_placements(found)
        if isinstance(found, _Attention) and is_size_only_causal(gm, found, ctx, causal_masks):
            found.attn_mask, found.terms, found.is_causal = None, [], True
            causal += 1
        if isinstance(found, str):
            kept[found].append(node)
        elif found is not None:
            backends[_lower(gm.graph, found)] += 1
    for reason, nodes in kept.items():
        ctx.note(f"attention not lowered to autotp.attention ({len(nodes)}x, first in "
                 f"`{module_path(nodes[0]) or nodes[0].name}`): {reason}")
    if backends:
        lowered = ", ".join(f"{n}x {b}" for b, n in sorted(backends.items()))
        ctx.note(f"attention lowered to autotp.attention: {lowered}")
    if causal:
        ctx.note(f"{causal} attention mask(s) built from the sequence length alone are the causal mask: "
                 f"is_causal=True (the fused kernels take no mask)")
        gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()
    if backends:
        check_local_shapes(gm, ctx.world)
    return gm


# ---------------------------------------------------------------- matching

def _match_sdpa(node: fx.Node) -> _Attention | str:
    bound = {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None, "enable_gqa": False,
             **dict(zip(_SDPA_ARGS, node.args)), **node.kwargs}
    if bound["dropout_p"] != 0.0:
        return (f"dropout_p={bound['dropout_p']} inside SDPA: autotp.attention has no dropout (its "
                f"backward recomputes the forward, which would need the same random mask)")
    q, k, v = bound["query"], bound["key"], bound["value"]
    scale = bound["scale"] if bound["scale"] is not None else 1.0 / math.sqrt(val(q).shape[-1])
    found = _Attention(node, q, k, v, attn_mask=bound["attn_mask"], is_causal=bool(bound["is_causal"]),
                       scale=float(scale), enable_gqa=bool(bound["enable_gqa"]), replaced=[node])
    return found if found.enable_gqa else _unrepeat_kv(found)


def _match_chain(pv: fx.Node) -> _Attention | str | None:
    """``pv`` = matmul(weights, v); None when no q @ k^T -> softmax chain leads to it."""
    if len(pv.args) != 2 or not all(isinstance(a, fx.Node) for a in pv.args):
        return None
    weights, v = pv.args
    post = []                                           # softmax -> pv, last first
    x = weights
    while x.op == "call_function" and x.target not in _SOFTMAXES and (x.target in _CASTS or
                                                                       x.target == aten.dropout.default):
        post.append(x)
        x = x.args[0]
    if x.op != "call_function" or x.target not in _SOFTMAXES:
        return None
    softmax = x
    pre = _path_to_scores(softmax.args[0], depth=8)      # softmax input -> the q @ k^T matmul
    if pre is None:
        return None
    qk, pre = pre[-1], pre[:-1]
    k_t = qk.args[1]
    q, k = qk.args[0], k_t.args[0]
    found = _Attention(pv, q, k, v, scores=qk, replaced=[pv, *post, softmax, *pre, qk, k_t])

    # from here on it is attention: anything that stops the lowering is a reason, noted
    for n in found.replaced[1:]:
        if len(n.users) != 1:
            what = "attention weights" if n in post or n is softmax else "scores"
            return f"the {what} are also used outside the attention (returned or stored)"
    for n in post:
        if n.target == aten.dropout.default and n.args[1] != 0 and n.args[2]:
            return (f"dropout p={n.args[1]} on the attention weights in training: autotp.attention has "
                    f"no dropout")
    if not _is_last_dim(softmax):
        return f"softmax over dim {softmax.args[1]}, not over the keys"
    tq, tk, tv, tout = val(q), val(k), val(v), val(pv)
    if not (tq.dtype == tk.dtype == tv.dtype == tout.dtype == val(qk).dtype):
        return f"q, k, v, scores and output dtypes differ ({tq.dtype}, {tk.dtype}, {tv.dtype}, {tout.dtype})"
    if not (tq.shape[:-2] == tk.shape[:-2] == tv.shape[:-2]) or tk.shape[-2] != tv.shape[-2]:
        return f"q, k, v batch dims broadcast ({list(tq.shape)}, {list(tk.shape)}, {list(tv.shape)})"
    problem = _fold_scores(found, list(reversed(pre)), qk)
    return problem if problem else _unrepeat_kv(found)


def _path_to_scores(x, depth: int) -> list[fx.Node] | None:
    """Nodes from ``x`` back to a ``q @ k^T`` matmul (last), following scores-shaped inputs."""
    if not isinstance(x, fx.Node) or x.op != "call_function":
        return None
    if _is_qk(x):
        return [x]
    if depth == 0 or not isinstance(val(x), torch.Tensor):
        return None
    for a in x.all_input_nodes:
        if isinstance(val(a), torch.Tensor) and val(a).shape == val(x).shape:
            path = _path_to_scores(a, depth - 1)
            if path is not None:
                return [x, *path]
    return None


def _is_qk(x: fx.Node) -> bool:
    if x.target not in _MATMULS or len(x.args) != 2 or not all(isinstance(a, fx.Node) for a in x.args):
        return False
    k_t = x.args[1]
    nd = val(x).ndim if isinstance(val(x), torch.Tensor) else 0
    if nd not in (3, 4) or val(x.args[0]).ndim != nd or val(k_t).ndim != nd:
        return False
    return (k_t.op == "call_function" and k_t.target == aten.transpose.int
            and {k_t.args[1] % nd, k_t.args[2] % nd} == {nd - 2, nd - 1})


def _is_last_dim(softmax: fx.Node) -> bool:
    nd = val(softmax).ndim
    return softmax.args[1] % nd == nd - 1


def _fold_scores(found: _Attention, ops: list[fx.Node], qk: fx.Node) -> str | None:
    """Read the ops between q @ k^T and the softmax (forward order) into scale and mask terms."""
    scores = val(qk)
    prev = qk
    for op in ops:
        a = op.args
        if op.target in _CASTS:
            if val(op).dtype != scores.dtype:
                return f"the scores are cast to {val(op).dtype} before the softmax"
        elif op.target in _SCALES and a[0] is prev and _constant(a[1]) is not None:
            if found.terms:
                return "the scores are scaled after the mask is applied"
            c = _constant(a[1])
            found.scale = found.scale * c if op.target in (aten.mul.Tensor, aten.mul.Scalar) else found.scale / c
            found.constants.append(a[1])
        elif op.target == aten.mul.Tensor and a[1] is prev and _constant(a[0]) is not None:
            if found.terms:
                return "the scores are scaled after the mask is applied"
            found.scale *= _constant(a[0])
            found.constants.append(a[0])
        elif op.target == aten.add.Tensor and op.kwargs.get("alpha", 1) == 1:
            mask = a[1] if a[0] is prev else a[0]
            if not isinstance(mask, fx.Node):
                return f"a constant ({mask}) is added to the scores"
            problem = _check_mask(mask, scores, additive=True)
            if problem:
                return problem
            found.terms.append(_MaskTerm("add", mask, source=op))
        elif op.target in _WHERES or (op.target in _FILLS and a[0] is prev):
            if op.target in _FILLS:
                cond, fill, kind = a[1], a[2], "drop"
            elif prev not in (a[1], a[2]) or a[1] is a[2]:
                return "a where() whose branches are not the scores and a constant"
            else:
                cond, kind = a[0], "keep" if a[1] is prev else "drop"
                fill = a[2] if kind == "keep" else a[1]
            problem = _check_mask(cond, scores, additive=False) or _check_fill(fill, scores.dtype)
            if problem:
                return problem
            found.terms.append(_MaskTerm(kind, cond, _constant(fill), source=op))
            found.constants.append(fill)
        elif op.target == aten.tanh.default:
            return "logit soft-capping (tanh of the scores) has no SDPA equivalent"
        else:
            name = getattr(op.target, "__name__", str(op.target))
            return f"`{name}` between the scores and the softmax has no SDPA equivalent"
        prev = op
    return None


def _check_mask(mask: fx.Node, scores: torch.Tensor, additive: bool) -> str | None:
    m = val(mask)
    if not isinstance(m, torch.Tensor):
        return "a mask is not a tensor"
    if additive and m.dtype != scores.dtype:
        return f"an additive mask is {m.dtype}, the scores {scores.dtype}"
    if not additive and m.dtype != torch.bool:
        return f"the condition of where/masked_fill is {m.dtype}, not bool"
    try:
        if tuple(torch.broadcast_shapes(m.shape, scores.shape)) != tuple(scores.shape):
            raise RuntimeError
    except RuntimeError:
        return f"a mask {list(m.shape)} does not broadcast to the scores {list(scores.shape)}"
    return None


def _check_fill(fill, dtype: torch.dtype) -> str | None:
    c = _constant(fill)
    if c is None:
        return "masked scores are filled with a tensor, not a constant"
    if not (c == -math.inf or c <= torch.finfo(dtype).min):
        return (f"masked scores are filled with {c:g}, not -inf or the dtype's minimum: as an additive "
                f"mask a fully-masked row would come out different")
    return None


def _constant(x) -> float | None:
    """The value of a Python number or of a 0-d constant node (``full([], c)``, ``scalar_tensor(c)``)."""
    if isinstance(x, (int, float)) and not isinstance(x, bool):
        return float(x)
    if isinstance(x, fx.Node) and x.op == "call_function":
        if x.target == aten.full.default and len(x.args[0]) == 0 and isinstance(x.args[1], (int, float)):
            return float(x.args[1])
        if x.target == aten.scalar_tensor.default and isinstance(x.args[0], (int, float)):
            return float(x.args[0])
    return None


# ---------------------------------------------------------------- GQA

def _unrepeat_kv(found: _Attention) -> _Attention:
    """Feed k, v from before their ``repeat_kv`` with ``enable_gqa=True``, when that is safe."""
    if val(found.q).ndim != 4:
        return found
    # kv heads replicated over groups reach a rank's query heads through a group_slice of the repeat
    k_slice, v_slice = (x if x.target is comm.group_slice and len(x.users) == 1 else None for x in (found.k, found.v))
    k_rep = _repeat_kv_source(k_slice.args[0] if k_slice is not None else found.k)
    v_rep = _repeat_kv_source(v_slice.args[0] if v_slice is not None else found.v)
    if k_rep is None or v_rep is None:
        return found
    (k, k_nodes, k_n, k_f), (v, v_nodes, v_n, v_f) = k_rep, v_rep
    if k_n != v_n or val(k).shape[1] != val(v).shape[1]:
        return found
    pq = _placement(found.q)
    heads_split = pq == R or (is_shard(pq) and pq.dim == 1)
    for src, rep, f in ((k, found.k, k_f), (v, found.v, v_f)):
        same = _placement(src) == pq == _placement(rep) and f is None
        # MQA: one kv head, replicated, serves whichever query heads a rank holds; likewise the one
        # local kv head of a group that holds it whole (Grid(S(1), R, H_kv))
        single_kv_head = _local_heads(src) == 1 and heads_split
        if not (same or single_kv_head):
            return found            # the local heads would not line up; keep the (correct) repeats
    found.k, found.v, found.enable_gqa = k_f or k, v_f or v, True
    found.regrad = [(f, src) for f, src in ((k_f, k), (v_f, v)) if f is not None]
    found.replaced += k_nodes + v_nodes + [x for x in (k_slice, v_slice) if x is not None]
    return found


def _local_heads(src: fx.Node) -> int:
    """Heads (dim 1) of ``src`` on one rank: all of them when replicated, 1 per group of a Grid."""
    p = _placement(src)
    if p == R:
        return val(src).shape[1]
    if isinstance(p, Grid) and is_shard(p.outer) and p.outer.dim == 1 and p.inner == R:
        return val(src).shape[1] // p.groups
    return -1


def _repeat_kv_source(rep: fx.Node):
    """(k, nodes, n_rep, f) if ``rep`` = reshape(expand(k[:, :, None]), (B, H_kv * n_rep, L, D)) and
    every node of that only feeds the next (``nodes``: reshape first).  ``f`` is the ``reduce_grad``
    collectives put on a replicated k feeding the sharded repeat (Megatron's f), or None; lowering
    moves it onto k itself, whose gradient is then the partial sum over the local query heads."""
    if rep.op != "call_function" or rep.target not in (aten.reshape.default, aten.view.default,
                                                         aten._unsafe_view.default):
        return None
    nodes, grad_reduces = [rep], []
    expand = rep.args[0]
    if not isinstance(expand, fx.Node) or expand.target != aten.expand.default:
        return None
    nodes.append(expand)
    x = _skip_identities(expand.args[0], nodes, grad_reduces)
    if x.target != aten.unsqueeze.default or x.args[1] % 5 != 2:
        return None
    nodes.append(x)
    src = _skip_identities(x.args[0], nodes, grad_reduces)
    s, e, r = val(src).shape, val(expand).shape, val(rep).shape
    if len(s) != 4 or len(e) != 5 or len(r) != 4 or len(grad_reduces) > 1:
        return None
    n_rep = e[2]
    if tuple(e) != (s[0], s[1], n_rep, s[2], s[3]) or tuple(r) != (s[0], s[1] * n_rep, s[2], s[3]):
        return None
    if any(len(n.users) != 1 for n in nodes + grad_reduces):
        return None
    return src, nodes, n_rep, (grad_reduces[0] if grad_reduces else None)


def _skip_identities(x: fx.Node, nodes: list[fx.Node], grad_reduces: list[fx.Node]) -> fx.Node:
    """Walk back over ``x[:, :]``-style slices that keep the whole tensor (into ``nodes``) and
    ``reduce_grad`` (identity forward; into ``grad_reduces``)."""
    while x.op == "call_function":
        if x.target is comm.reduce_grad:
            grad_reduces.append(x)
        elif (x.target == aten.slice.Tensor and (x.args[2] if len(x.args) > 2 else 0) in (0, None)
              and (x.args[4] if len(x.args) > 4 else 1) == 1 and val(x).shape == val(x.args[0]).shape):
            nodes.append(x)
        else:
            break
        x = x.args[0]
    return x


# ---------------------------------------------------------------- placements

def _placement(node):
    p = node.meta.get("autotp", {}).get("placement") if isinstance(node, fx.Node) else None
    return R if p is None else p


def _broadcast_placement(shape, out_shape, out_p):
    """The placement a tensor of ``shape`` needs to broadcast into an ``out_p`` tensor of ``out_shape``."""
    if not is_shard(out_p):
        return R
    d = out_p.dim - (len(out_shape) - len(shape))
    spans = d >= 0 and shape[d] == out_shape[out_p.dim] and shape[d] != 1
    return S(d, split_factor(out_p)) if spans else R


def _check_placements(found: _Attention) -> _Attention | str:
    p = _placement(found.output)
    if not (p == R or is_shard(p)):          # a partial sum cannot come out of a softmax
        return f"the attention output is placed {p}"
    if not found.enable_gqa and not (_placement(found.q) == _placement(found.k) == _placement(found.v) == p):
        return "q, k and v are placed differently from the attention output"
    for t in found.terms:
        want = _broadcast_placement(val(t.node).shape, val(found.scores).shape, p)
        if _placement(t.node) != want:
            return f"a mask is placed {_placement(t.node)} where the scores need {want}"
    return found


# ---------------------------------------------------------------- rewriting

def _lower(graph: fx.Graph, found: _Attention) -> str:
    """Put the op in place of ``found.output``; returns "backend (why)" for the traced values."""
    out = found.output
    p = _placement(out)
    with graph.inserting_before(out):
        mask = found.attn_mask if found.attn_mask is not None else _additive_mask(graph, found, p)
        node = _new(graph, ATTENTION, (found.q, found.k, found.v),
                    {"attn_mask": mask, "is_causal": found.is_causal, "scale": found.scale,
                     "enable_gqa": found.enable_gqa}, p, out)
    # asked with the traced (fake) values: their device and dtype are the run's
    traced = [n.meta["val"] if n is not None else None for n in (found.q, found.k, found.v, mask)]
    backend, why = select_backend(*traced, found.is_causal, found.enable_gqa)
    node.meta["autotp"]["lowered"] = backend
    for f, src in found.regrad:        # reduce_grad(k[:, :, None]) -> reduce_grad(k): the same all-reduce
        f.args = (src, *f.args[1:])
        f.meta["val"], f.meta["autotp_val"] = src.meta["val"], val(src)
        f.meta["autotp"]["reason"] = (f"{src.name} is R and feeds sharded {node.name}: its gradient is a "
                                      f"partial sum, all-reduced in backward")
    out.replace_all_uses_with(_traced_layout(graph, node, out, p))
    for n in found.replaced:
        if not n.users:
            graph.erase_node(n)
    for c in found.constants:
        if isinstance(c, fx.Node) and not getattr(c, "_erased", False) and not c.users:
            graph.erase_node(c)
    return f"{backend} ({why})"


def _additive_mask(graph: fx.Graph, found: _Attention, p) -> fx.Node | None:
    """One additive mask from the chain's terms (None without terms); nodes go before the output."""
    scores = val(found.scores)                                         # (..., L_q, L_k)
    mask = None
    for t in found.terms:
        if t.kind == "add":
            term = t.node
        else:
            shape = val(t.node).shape
            fill = _new(graph, aten.scalar_tensor.default, (t.fill,),
                        {"dtype": scores.dtype, "device": found.q.meta["val"].device}, R, t.source)
            args = (t.node, 0.0, fill) if t.kind == "keep" else (t.node, fill, 0.0)
            target = aten.where.ScalarSelf if t.kind == "keep" else aten.where.ScalarOther
            term = _new(graph, target, args, {}, _broadcast_placement(shape, scores.shape, p), t.source)
        if mask is None:
            mask = term
        else:
            shape = torch.broadcast_shapes(val(mask).shape, val(term).shape)
            mask = _new(graph, aten.add.Tensor, (mask, term), {}, _broadcast_placement(shape, scores.shape, p),
                        t.source)
    return mask


def _traced_layout(graph: fx.Graph, node: fx.Node, out: fx.Node, p) -> fx.Node:
    """``node`` (the op's output, contiguous (B, H, L, D)) in the layout export traced ``out``
    with, where a ``view`` relies on it.  SDPA's fused kernels return (B, H, L, D) stored as
    (B, L, H, D) (AFMoE views ``out.transpose(1, 2)`` as (B, L, H*D), valid only in that
    layout); the same layout is made here with plain ops, one copy.  Anything else (a
    ``reshape``, which copies when it must) is left as it is."""
    traced = out.meta.get("val")
    if not isinstance(traced, torch.Tensor) or traced.ndim != 4 or traced.is_contiguous() \
            or not traced.transpose(1, 2).is_contiguous() or not _viewed(out):
        return node
    swapped = S({1: 2, 2: 1}.get(p.dim % 4, p.dim % 4), split_factor(p)) if is_shard(p) else p
    with graph.inserting_after(node):
        t = _new(graph, aten.transpose.int, (node, 1, 2), {}, swapped, out)
    with graph.inserting_after(t):
        c = _new(graph, aten.clone.default, (t,), {"memory_format": torch.contiguous_format}, swapped, out)
    with graph.inserting_after(c):
        return _new(graph, aten.transpose.int, (c, 1, 2), {}, p, out)


def _viewed(out: fx.Node) -> bool:
    """Whether a ``view`` reads ``out`` (through transposes and same-shape reshapes): the one op
    whose validity depends on the layout (a reshape to another shape copies when it must)."""
    seen, todo = set(), [out]
    while todo:
        n = todo.pop()
        for u in n.users:
            if u.target == aten.view.default:
                return True
            same = u.target == aten.reshape.default and u.meta["val"].shape == n.meta["val"].shape   # a no-op
            if (same or u.target in (aten.transpose.int, aten.permute.default, aten.alias.default)) and u not in seen:
                seen.add(u)
                todo.append(u)
    return False


def _new(graph: fx.Graph, target, args: tuple, kwargs: dict, placement, like: fx.Node) -> fx.Node:
    """A node with the meta the later passes and dumps read, its values computed on fake/meta tensors."""
    name = "attention" if target is ATTENTION else None
    node = graph.create_node("call_function", target, args, kwargs, name=name)
    fake_args, fake_kwargs = fx.node.map_arg((args, kwargs), lambda n: n.meta["val"])
    with detect_fake_mode([like.meta["val"]]):      # the graph's one fake mode (symbolic sizes)
        node.meta["val"] = target(*fake_args, **fake_kwargs)
    meta_args, meta_kwargs = fx.node.map_arg((args, kwargs), _meta)
    if "device" in meta_kwargs:
        meta_kwargs = {**meta_kwargs, "device": "meta"}
    node.meta["autotp_val"] = target(*meta_args, **meta_kwargs)
    for key in ("stack_trace", "nn_module_stack"):
        if key in like.meta:
            node.meta[key] = like.meta[key]
    node.meta["autotp"] = {"placement": placement}
    return node


def _meta(node: fx.Node) -> torch.Tensor:
    """The node's value as a meta tensor of concrete (example) sizes."""
    v = val(node)
    return torch.empty([int(s) for s in v.shape], dtype=v.dtype, device="meta")
