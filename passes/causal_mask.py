"""Is an attention mask the causal mask, built from the sizes alone?

``lower_attention`` asks this of every mask it lowers: a mask that depends on nothing but the
batch and sequence sizes and equals ``tril`` at every probe size is dropped for
``is_causal=True`` (the fused kernels take no mask).  It is run, not pattern-matched: the
mask's sub-graph is evaluated at a few (batch, seq) sizes and compared.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from autotp.passes.context import PassContext

aten = torch.ops.aten

_PROBE_SIZES = ((2, 2), (1, 3), (3, 7), (2, 16), (1, 33))     # (batch, seq) the mask is checked at


def is_size_only_causal(gm: fx.GraphModule, found, ctx: PassContext,
                        cache: dict | None = None) -> bool:
    """Whether ``found.attn_mask`` depends on nothing but the batch and sequence sizes and
    equals the causal mask (bool ``tril``, or 0 / -inf additive) at every probe size, with
    queries and keys of the same length.  A chain's single ``where`` term counts too (its
    condition keeps, or drops, exactly the causal positions; the fill is -inf or the minimum).
    ``cache`` holds the verdict per (mask node, inverted): every layer of a decoder reads the
    same mask node, evaluated once instead of once per layer."""
    invert = False
    if found.is_causal:
        return False
    if found.attn_mask is not None and not found.terms:
        mask = found.attn_mask
    elif found.attn_mask is None and len(found.terms) == 1:
        mask, invert = found.terms[0].node, found.terms[0].kind == "drop"
    else:
        return False
    qv, kv = found.q.meta.get("val"), found.k.meta.get("val")
    if not (isinstance(qv, torch.Tensor) and isinstance(kv, torch.Tensor)) or \
            str(qv.shape[-2]) != str(kv.shape[-2]):
        return False
    if cache is None:
        return _mask_is_causal(gm, mask, invert, ctx)
    if (mask, invert) not in cache:
        cache[(mask, invert)] = _mask_is_causal(gm, mask, invert, ctx)
    return cache[(mask, invert)]


def _mask_is_causal(gm: fx.GraphModule, mask: fx.Node, invert: bool, ctx: PassContext) -> bool:
    """The part of ``_is_size_only_causal`` that depends on the mask alone."""
    sub, leaves, stack = set(), [], [mask]
    while stack:                                   # the mask's ancestors, stopping at sizes
        n = stack.pop()
        if n in sub:
            continue
        sub.add(n)
        if n.op == "call_function" and n.target == aten.sym_size.int:
            leaves.append(n)
        elif n.op == "call_function":
            stack.extend(n.all_input_nodes)
        elif n.op != "get_attr":
            return False                           # a placeholder: the mask reads tensor data
    names = {}
    for leaf in leaves:
        size = leaf.meta.get("val")
        if not isinstance(size, torch.SymInt):
            return False
        for sym in size.node.expr.free_symbols:
            names[sym] = ctx.size_names.get(sym)
    if not names or not set(names.values()) <= {"batch", "seq"}:
        return False
    graph, env = fx.Graph(), {}
    order = [n for n in gm.graph.nodes if n in sub]
    cpu = torch.device("cpu")
    for n in order:
        if n in leaves:
            env[n] = graph.placeholder(n.name)
        else:
            env[n] = graph.node_copy(n, lambda a: env[a])
            env[n].args, env[n].kwargs = _on_cpu((env[n].args, env[n].kwargs), cpu)
    graph.output(env[mask])
    probe = fx.GraphModule(gm, graph)
    for b, s in _PROBE_SIZES:
        values = {sym: b if name == "batch" else s for sym, name in names.items()}
        try:
            m = probe(*[int(leaf.meta["val"].node.expr.xreplace(values)) for leaf in order if leaf in leaves])
        except Exception:  # noqa: BLE001 — a mask that cannot be evaluated is kept as it is
            return False
        causal = torch.ones(s, s, dtype=torch.bool).tril()
        if not isinstance(m, torch.Tensor) or m.shape[-2:] != (s, s):
            return False
        if invert:
            ok = m.dtype == torch.bool and bool((~m == causal).all())
        elif m.dtype == torch.bool:
            ok = bool((m == causal).all())
        elif m.is_floating_point():
            ok = bool(((m == 0) == causal).all()) and bool((m[..., ~causal] <= torch.finfo(m.dtype).min).all())
        else:
            ok = False
        if not ok:
            return False
    return True


def _on_cpu(tree, cpu):
    from torch.utils import _pytree as pytree
    return pytree.tree_map(lambda a: cpu if isinstance(a, torch.device) else a, tree)
