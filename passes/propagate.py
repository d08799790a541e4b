"""propagate_placements: enumerate, for every node, the strategies its rule allows.

Writes ``node.meta["autotp"]["strategies"]`` (a list of ``Strategy``).  Candidates flow
forward: a rule sees which placements each input's producer can deliver, so a fused dim's
strided layout (``S(d)x3``) reaches the ops that can use it.  Parameters may take any
placement their shape divides into; user inputs and buffers start replicated.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx

from autotp.passes.context import AutoTPError, PassContext, where
from autotp.passes.rules import RuleContext, Strategy, dedupe, find_rule, replicate_strategy, tensor_inputs, val
from autotp.passes.rules.attention import kv_head_groups, kv_head_rows
from autotp.passes.rules.grid import grid_strategies
from autotp.passes.rules.tokens import seq_symbols, token_rows, token_strategies
from autotp.passes.rules.views import slice_bounds, split_dim, static_dim
from autotp.placement import Grid, R, S, Sizes, can_shard, factor_key, is_shard

aten = torch.ops.aten

# Ops whose output is a fresh tensor built from scalars: always replicated, never worth a note.
_SPLITTING_OPS = (aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default)


def split_factors(gm: fx.GraphModule) -> tuple:
    """Strided-shard factors worth trying: the equal-split counts that occur in the graph, the
    block counts of a dim unflattened into (blocks, size), and, for a dim cut into *unequal*
    pieces, the tuple of their sizes (``placement.Blocks``): the sizes of a ``split_with_sizes``
    (``q, k, v = qkv.split((Q, K, V), -1)``), or the bounds of the slices of one tensor along one
    dim that tile it (``qkv[..., :Q]``, ``qkv[..., Q:Q+K]``, ``qkv[..., Q+K:]``)."""
    factors = {1}
    slices: dict = {}                             # (tensor, dim) -> the [start, end) of its slices
    for n in gm.graph.nodes:
        if n.op == "call_function" and n.target in _SPLITTING_OPS and isinstance(val(n), (list, tuple)):
            outs = val(n)
            if len({o.shape for o in outs}) == 1:
                factors.add(len(outs))
            elif n.target == aten.split_with_sizes.default and static_dim(n.args[0], d := split_dim(n) % outs[0].ndim):
                factors.add(tuple(int(o.shape[d]) for o in outs))
        elif n.op == "call_function" and n.target == aten.unflatten.int and len(n.args[2]) == 2:
            factors.add(n.args[2][0])             # a packed [q|k|v] viewed as (3, E): nn.MultiheadAttention
        elif n.op == "call_function" and n.target == aten.slice.Tensor and (bounds := slice_bounds(n)) is not None:
            slices.setdefault((n.args[0], bounds[0]), set()).add(bounds[1:])
    for (x, d), spans in slices.items():
        if (sizes := _tiling(sorted(spans), val(x).shape[d])) is not None and len(set(sizes)) > 1:
            factors.add(sizes)
    return tuple(sorted(factors, key=factor_key))


def _tiling(spans: list, size: int) -> tuple | None:
    """The sizes of ``spans`` (sorted ``(start, end)`` pairs) if they cut ``[0, size)`` into
    consecutive pieces, each once; else None."""
    at, sizes = 0, []
    for start, end in spans:
        if start != at or end <= start:
            return None
        sizes.append(end - start)
        at = end
    return tuple(sizes) if at == size and len(sizes) > 1 else None


def meta(node: fx.Node) -> dict:
    return node.meta.setdefault("autotp", {})


def propagate_placements(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    factors = split_factors(gm)
    kv_groups = kv_head_groups(gm, ctx.world, ctx.params)
    if ctx.dp_sharded and any(g > 1 for gs in kv_groups.values() for g in gs):
        ctx.note("fewer kv heads than tensor-parallel ranks: kv heads are not replicated over the ranks that read "
                 "them when FSDP2 shards the parameters (their 2-D placement is not offered with FSDP2), so the "
                 "kv heads are split and gathered; use a tensor-parallel size at most the kv head count to avoid it")
        kv_groups = {}
    kv_rows = kv_head_rows(gm, ctx.world, ctx.params) if kv_groups and not ctx.dp_sharded else {}
    candidates: dict[fx.Node, set] = {}
    rctx = RuleContext(world=ctx.world, factors=factors, _candidates=candidates)
    unknown: dict[str, list[fx.Node]] = {}
    # token-local rows and sequence shards only where the user asked for sequence splits: a plain
    # TP plan runs any batch and sequence length (a split of either would need it to divide by N)
    seq_syms = seq_symbols(ctx.size_names) if ctx.world > 1 and ctx.activation_terms else frozenset()
    for node in gm.graph.nodes:
        if node.op == "output":
            continue
        v = val(node)
        if node.op == "placeholder":
            strategies = _placeholder_strategies(node, ctx, factors, kv_groups, kv_rows)
            if node.name in kv_groups:        # the solver's memory budget allows their replication
                meta(node)["kv_groups"] = kv_groups[node.name]
        elif node.op == "call_function" and node.target is operator.getitem:
            meta(node)["alias_of"] = (node.args[0], node.args[1])
            src = meta(node.args[0]).get("strategies")
            if src is None or not isinstance(val(node.args[0]), (tuple, list)):
                continue
            outs = {s.output[node.args[1]] for s in src if isinstance(s.output, tuple)}
            candidates[node] = {p for p in outs if p is not None}
            continue
        elif node.op == "call_function":
            if not _has_tensor(v):
                continue
            rule = find_rule(node.target)
            extra = token_strategies(node, rctx, seq_syms) if seq_syms else []
            if rule is None:
                strategies = [replicate_strategy(node)]
                # only worth saying when the op could have received something sharded
                if not extra and any(p != R for a in tensor_inputs(node) for p in candidates.get(a, ())):
                    unknown.setdefault(str(node.target), []).append(node)
            else:
                batch = _batch_info(node, ctx) if ctx.size_names else None
                strategies = [s for s in rule(node, rctx) if batch is None or not _splits_batch(s, batch)]
                # EP x TP experts (rules/grid.py); the token-local rules for rows dispatched to a group
                tokens = (lambda n, c: token_strategies(n, c, seq_syms)) if seq_syms else None
                strategies += grid_strategies(node, rule, rctx, tokens)
            if extra:                     # token-local strategies (tokens.py) beside the op's own
                strategies = dedupe(strategies + extra)
        else:
            continue
        meta(node)["strategies"] = strategies
        outs = set()
        for s in strategies:
            outs |= set(s.output) if isinstance(s.output, tuple) else {s.output}
        candidates[node] = {p for p in outs if p is not None} | _sequence_shards(node, ctx) | token_rows(node, seq_syms)
    _report_unknown(unknown, ctx)
    _report_dropout(gm, ctx)
    return gm


def _batch_info(node: fx.Node, ctx: PassContext) -> tuple:
    """What ``_splits_batch`` reads of ``node``, once for all its strategies: its value(s), its
    tensor inputs' values, and ``dims(t)``: the dims of ``t`` no strategy may split — those whose
    size is the batch symbol alone and, unless the plan may split the sequence
    (``ctx.activation_terms``), every dim whose size involves the sequence symbol."""
    memo: dict = {}
    seq_free = not ctx.activation_terms

    def fixed(size) -> bool:
        if not isinstance(size, torch.SymInt):
            return False
        names = {ctx.size_names.get(x) for x in size.node.expr.free_symbols}
        return names == {"batch"} or (seq_free and "seq" in names)

    def dims(t: torch.Tensor) -> set:
        if id(t) not in memo:
            memo[id(t)] = {d for d, size in enumerate(t.shape) if fixed(size)}
        return memo[id(t)]
    return node.meta.get("val"), [a.meta.get("val") for a in tensor_inputs(node)], dims


def _splits_batch(s: Strategy, batch: tuple) -> bool:
    """A strategy that splits the batch dim, or the sequence in a plan without sequence
    parallelism: valid for the example, but the plan must run any batch and sequence length (1,
    odd, a prompt of any length), where such a split would not divide.  Tensor parallelism splits
    weights, heads and (with ``sequence_parallel``) the sequence, never the batch.  ``batch``:
    ``_batch_info(node, ctx)``."""
    v, in_vals, dims = batch
    outs = list(zip(v, s.output)) if isinstance(s.output, tuple) and isinstance(v, (tuple, list)) else [(v, s.output)]
    ins = list(zip(in_vals, s.inputs))
    return any(p is not None and is_shard(p) and p.dim % max(t.ndim, 1) in dims(t)
               for t, p in outs + ins if isinstance(t, torch.Tensor))


def _sequence_shards(node: fx.Node, ctx: PassContext) -> set:
    """With ``sequence_parallel``, any floating activation may be split along its sequence dim
    (a reduce-scatter, all-to-all or local chunk gets it there): offering ``S(seq)`` as a
    candidate lets the ops downstream enumerate sequence-sharded strategies."""
    v = node.meta.get("val")
    if not ctx.activation_terms or node.op == "placeholder" or not isinstance(v, torch.Tensor) \
            or not v.is_floating_point():
        return set()
    out = set()
    for d, size in enumerate(v.shape):
        if isinstance(size, torch.SymInt) and ctx.size_names.get(size.node.expr) == "seq" \
                and can_shard(val(node).shape[d], 1, ctx.world):
            out.add(S(d))
    return out


def _report_dropout(gm: fx.GraphModule, ctx: PassContext) -> None:
    drops = [n for n in gm.graph.nodes if n.op == "call_function" and n.target == aten.dropout.default
             and len(n.args) > 2 and n.args[1] > 0 and n.args[2]]
    if drops:
        ctx.note(f"{len(drops)} dropout op(s) with p>0 were captured in training mode (first `{drops[0].name}`, "
                 f"p={drops[0].args[1]}): their masks differ from one device's; for exact equivalence "
                 f"call model.eval() or set the dropout probabilities to 0 before parallelize")


def _report_unknown(unknown: dict[str, list[fx.Node]], ctx: PassContext) -> None:
    for op, nodes in unknown.items():
        if ctx.strict:
            raise AutoTPError(
                f"autotp has no sharding rule for {op}, used by {where(nodes[0])}\n"
                f"  ({len(nodes)} node(s) in all). What to do: register a rule with "
                f"@autotp.register_rule({op}) (see docs/adding-a-rule.md), or call parallelize(..., "
                f"strict=False) to run this op replicated (its inputs are gathered first).")
        ctx.note(f"no sharding rule for {op} ({len(nodes)} node(s), first {nodes[0].name}): runs replicated")


def _has_tensor(v) -> bool:
    if isinstance(v, torch.Tensor):
        return True
    return isinstance(v, (tuple, list)) and any(isinstance(x, torch.Tensor) for x in v)


def _placeholder_strategies(node: fx.Node, ctx: PassContext, factors, kv_groups=None, kv_rows=None) -> list[Strategy]:
    v = val(node)
    if not isinstance(v, torch.Tensor):
        return []
    if node.name in ctx.state_outputs.values():
        return state_input_strategies(node, ctx, set().union(*(kv_groups or {}).values()))
    name = ctx.params.get(node.name)
    if name is None or not v.is_floating_point():
        return [Strategy((), R)]
    if name in ctx.pins:
        return [Strategy((), ctx.pins[name])]
    options = [Strategy((), R)]
    for d in range(v.ndim):
        for f in factors:
            if not can_shard(v.shape[d], f, ctx.world):
                continue
            if ctx.dp_sharded and f != 1:
                ctx.note(f"FSDP2 shards the parameters over another mesh dim: no strided shard (S(d)xf, or "
                         f"S(d)[a|b|c] of unequal blocks) of a fused parameter is offered, since FSDP2 and torch.distributed.checkpoint cannot describe "
                         f"its pieces (first: `{name}`); such a weight is split contiguously or replicated, and its "
                         f"blocks may be gathered")
                continue
            options.append(Strategy((), S(d, f)))
    if ctx.dp_sharded:
        return options
    return options + grid_options(v, ctx.world, factors) + [
        Strategy((), Grid(S(d), R, g)) for g in sorted((kv_groups or {}).get(node.name, ())) if g > 1 for d in range(v.ndim) if can_shard(v.shape[d], 1, g)] + \
        fused_kv_options(v, ctx.world, factors, (kv_rows or {}).get(node.name, ()))


def fused_kv_options(v: torch.Tensor, world: int, factors, rows) -> list[Strategy]:
    """A fused ``[q | k | v]`` weight whose k and v blocks compute the kv heads of an attention
    with ``H_kv < N`` (``rows``: ``rules/attention.kv_head_rows``) may be split per block with each
    block cut into its own number of pieces (``placement.Sizes``): a q block over all N ranks, a
    k or v block over ``H_kv`` groups and whole inside each (whole on every rank for MQA), so
    cutting the fused output gives q ``S(d)`` and k, v ``Grid(S(d), R, H_kv)`` — what separate
    k/v projections give.  Offered for every unequal-block factor of the graph whose blocks the
    rows fall on, with at least one block split over all ranks."""
    out = []
    for f in factors:
        if not isinstance(f, tuple):
            continue
        starts = [sum(f[:j]) for j in range(len(f))]
        for g in sorted({r[0] for r in rows}):
            groups = tuple(g if any(r[0] == g and r[1] == sum(f) and r[2] <= a and a + b <= r[3] for r in rows)
                           else None for a, b in zip(starts, f))
            if None not in groups or all(x is None for x in groups):
                continue
            sizes = Sizes(f, groups)
            out += [Strategy((), S(d, sizes)) for d in range(v.ndim) if can_shard(v.shape[d], sizes, world)]
    return out


def grid_options(v: torch.Tensor, world: int, factors) -> list[Strategy]:
    """A stacked expert weight (3-D: experts first) may also split both ways: whole experts over
    ``a`` groups of ranks and a column or row slice of each over the ``N/a`` ranks of a group
    (``Grid``), for every ``a`` that divides both N and the expert count, 1 < a < N.

    (A parameter feeding k or v of an attention with ``H_kv < N`` kv heads is offered
    ``Grid(S(d), R, H_kv)`` too: split by kv head over groups, whole inside a group —
    ``_placeholder_strategies``, ``rules/attention.kv_head_groups``.)"""
    if v.ndim != 3 or world < 4:
        return []
    out = []
    for groups in range(2, world):
        if world % groups or not can_shard(v.shape[0], 1, groups):
            continue
        for d in (1, 2):
            for f in factors:
                if isinstance(f, int) and can_shard(v.shape[d], f, world // groups):
                    out.append(Strategy((), Grid(S(0), S(d, f), groups)))
    return out


def state_input_strategies(node: fx.Node, ctx: PassContext, kv_groups=()) -> list[Strategy]:
    """A user input carried from call to call (``ctx.state_outputs``, a KV cache): replicated,
    or split on any fixed-size dim that divides (the heads of a cache), or split over ``g`` groups
    of ranks and whole inside each (``kv_groups``: a cache of kv heads replicated over the ranks
    that read them).  Symbolic dims (batch, cache length) are not split: their local size would
    depend on the call."""
    options = [Strategy((), R)]
    for d, size in enumerate(node.meta["val"].shape):
        if isinstance(size, torch.SymInt) and size.node.expr.is_number:
            size = int(size.node.expr)
        if isinstance(size, int) and can_shard(size, 1, ctx.world):
            options.append(Strategy((), S(d)))
        if isinstance(size, int):
            options += [Strategy((), Grid(S(d), R, g)) for g in sorted(kv_groups) if g > 1 and can_shard(size, 1, g)]
    return options
