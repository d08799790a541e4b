"""Rule conformance: prove a sharding rule's strategies on numbers.

A rule claims, for every ``Strategy`` it offers, that running the op on each rank's pieces of
the inputs gives each rank's piece of the true output.  ``check_rule`` tests that claim the way
DTensor tests its sharding strategies against OpInfo samples, with simulated ranks in one
process (no process group):

1. build a one-op fx graph whose node carries ``meta["val"]`` (the full output), as the rule
   sees it after capture;
2. ask the rule (and ``grid.py``'s pairing of it, where the world has a 2-D view) for its
   strategies, every input offered every placement its shape allows (R, P, D, S(d), S(d)xf, Grid);
3. per strategy and rank: cut the full inputs with ``placement.local_chunk`` (the runtime's own
   cut), split a ``P`` input into N random addends and a ``D`` input into N disjoint pieces,
   apply the strategy's ``localize`` hook (a view's local target shape, a vocab-parallel
   lookup, ...), run the op on the pieces;
4. compare with the op on the full inputs: shards against ``local_chunk`` of the full output,
   partial sums (P, D) summed over ranks, R equal on every rank;
5. backward, where the output is a float tensor: each rank's gradient of a sharded input is its
   piece of the full gradient, a replicated input's gradients are a partial sum (the gradient
   reduction the collectives pass inserts), a partial input's gradient is the full one.

Strategies whose semantics need the runtime's collectives are skipped and counted: dispatched
expert rows (``X``, and token-local rows ``L`` should a rule offer them) and hooks that insert
collectives (the vocab-parallel loss).  ``tokens.py``'s strategies are not asked for: they exist
only for the symbolic sequence sizes of an exported graph (``tests/test_tokens.py`` proves them
on models).  A rule author runs it on a new rule as::

    from autotp.conformance import check_rule, opinfo_samples
    samples = opinfo_samples(aten.logcumsumexp.default) + [((torch.randn(2, 8, 64), 1), {})]
    for world in (2, 3, 4):
        assert check_rule(aten.logcumsumexp.default, samples, world).failures == []
"""
from __future__ import annotations

import collections
import dataclasses

import torch
import torch.fx as fx
from torch.utils import _pytree as pytree

from autotp.placement import (D, P, R, S, X, Blocks, ExpertRows, Grid, TokenLocal, can_shard, fmt, group_replicated, groups_of,
                              local_chunk)

_FACTORS = (1, 2, 3)           # strided-shard factors offered (a fused [q|k|v] is 3, a gate/up pair 2)


@dataclasses.dataclass
class Failure:
    op: str
    strategy: str
    world: int
    sample: str
    message: str

    def __str__(self):
        return f"{self.op} {self.strategy} at world {self.world} on {self.sample}: {self.message}"


@dataclasses.dataclass
class Conformance:
    """What ``check_rule`` did: cases run (one per (sample, strategy)), skipped ones by reason."""
    ran: int = 0
    backward: int = 0
    skipped: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    failures: list = dataclasses.field(default_factory=list)
    cases: set = dataclasses.field(default_factory=set)       # distinct strategies run, by fmt

    def merge(self, other: "Conformance") -> "Conformance":
        self.ran += other.ran
        self.backward += other.backward
        self.skipped.update(other.skipped)
        self.failures += other.failures
        self.cases |= other.cases
        return self


# ---- the one-op graph ----

def one_op_graph(op, args: tuple, kwargs: dict) -> tuple[fx.Graph, fx.Node, list[torch.Tensor]]:
    """``op(*args, **kwargs)`` as a graph: one placeholder per tensor argument (in
    ``tensor_inputs`` order), the op node with ``meta["val"]`` set to the full output."""
    graph = fx.Graph()
    flat, spec = pytree.tree_flatten((args, kwargs))
    tensors, node_flat = [], []
    for a in flat:
        if isinstance(a, torch.Tensor):
            ph = graph.placeholder(f"x{len(tensors)}")
            ph.meta["val"] = a
            tensors.append(a)
            node_flat.append(ph)
        else:
            node_flat.append(a)
    nargs, nkwargs = pytree.tree_unflatten(node_flat, spec)
    node = graph.call_function(op, tuple(nargs), dict(nkwargs))
    node.meta["val"] = op(*args, **kwargs)
    graph.output(node)
    return graph, node, tensors


def input_candidates(t: torch.Tensor, world: int, factors=_FACTORS) -> set:
    """Every placement a producer could deliver ``t`` in: R, P and D (floats), S(d)xf where the
    dim divides, X (rows dispatched to experts: offered so its strategies are counted, then
    skipped), and the EP x TP Grid of a stacked (3-D) tensor where the world has a 2-D view."""
    out = {R}
    if t.is_floating_point() or t.is_complex():
        out |= {P, D}
    for d in range(t.ndim):
        out |= {S(d, f) for f in factors if can_shard(t.shape[d], f, world)}
    if t.ndim == 2 and t.is_floating_point():
        out.add(X)                       # rows dispatched to this rank's experts (a grouped matmul's input)
    if t.ndim == 3 and t.is_floating_point():
        from autotp.passes.propagate import grid_options
        out |= {s.output for s in grid_options(t, world, _FACTORS)}
    return out


def strategies_of(rule, node: fx.Node, tensors_nodes: list[fx.Node], world: int, factors=_FACTORS) -> list:
    from autotp.passes.rules import RuleContext, dedupe
    from autotp.passes.rules.grid import grid_strategies
    cands = {n: input_candidates(n.meta["val"], world, factors) for n in tensors_nodes}
    ctx = RuleContext(world=world, factors=factors, _candidates=cands)
    return dedupe(rule(node, ctx) + grid_strategies(node, rule, ctx))


# ---- cutting inputs, combining outputs ----

def rank_pieces(t: torch.Tensor, p, world: int, gen: torch.Generator, owners: dict) -> list[torch.Tensor]:
    """Each rank's piece of the full ``t`` under ``p``: ``local_chunk`` for R/S/Grid of shards,
    N random addends for P, N disjoint pieces (each dim-0 row on one rank) for D."""
    if p == P:
        addends = [torch.randn(t.shape, generator=gen, dtype=t.dtype) for _ in range(world - 1)]
        return addends + [t - sum(addends)]
    if p == D:
        key = t.shape[0] if t.ndim else 0
        if key not in owners:
            owners[key] = torch.randint(0, world, (max(key, 1),), generator=gen)
        own = owners[key].view(-1, *([1] * (t.ndim - 1))) if t.ndim else owners[key][0]
        return [torch.where(own == r, t, torch.zeros_like(t)) for r in range(world)]
    return [local_chunk(t, p, r, world) for r in range(world)]


def _close(got, want) -> str | None:
    if got.shape != want.shape:
        return f"shape {tuple(got.shape)} != {tuple(want.shape)}"
    if got.dtype != want.dtype and not (got.is_floating_point() and want.is_floating_point()):
        return f"dtype {got.dtype} != {want.dtype}"
    try:
        torch.testing.assert_close(got.to(want.dtype), want, atol=1e-4, rtol=1e-4, equal_nan=True)
    except AssertionError as e:
        return str(e).splitlines()[0] + " " + " ".join(str(e).splitlines()[1:3])
    return None


def check_output(full: torch.Tensor, locals_: list[torch.Tensor], p, world: int) -> str | None:
    """Whether the ranks' outputs are the pieces of ``full`` that placement ``p`` says."""
    if p == R:
        bad = [(r, m) for r, o in enumerate(locals_) if (m := _close(o, full))]
        return f"rank {bad[0][0]} (R): {bad[0][1]}" if bad else None
    if p in (P, D):
        m = _close(sum(locals_), full)
        if m:
            return f"sum over ranks ({fmt(p)}): {m}"
        overlap = sum((o != 0).to(torch.int) for o in locals_) > 1
        return f"D: {int(overlap.sum())} elements nonzero on more than one rank" if p == D and overlap.any() else None
    if isinstance(p, Grid) and p.outer in (P, D):
        b = world // p.groups
        for j in range(b):
            summed = sum(locals_[g * b + j] for g in range(p.groups))
            m = check_output(full, [summed] * 1, p.inner, 1) if p.inner in (R, P) else \
                _close(summed, local_chunk(full, p.inner, j, b))
            if m:
                return f"group rank {j} ({fmt(p)}): {m}"
        return None
    bad = [(r, m) for r, o in enumerate(locals_) if (m := _close(o, local_chunk(full, p, r, world)))]
    return f"rank {bad[0][0]} ({fmt(p)}): {bad[0][1]}" if bad else None


def _runtime_only(p) -> bool:
    if isinstance(p, tuple):
        return any(_runtime_only(q) for q in p)
    if isinstance(p, Grid):
        return _runtime_only(p.outer) or _runtime_only(p.inner)
    return isinstance(p, (TokenLocal, ExpertRows))


# ---- one rank's program ----

def _local_module(graph: fx.Graph, node: fx.Node, strategy, world: int, rank: int):
    """The one-op graph as ``rank`` runs it: the strategy's localize hook applied to a copy.
    None where the hook brings in a collective (the runtime's, not simulated here)."""
    from autotp import comm
    from autotp.passes.localize import LocalContext
    new = fx.Graph()
    env: dict = {}
    out = new.graph_copy(graph, env)
    new.output(out)
    local = env[node]
    local.meta["autotp"] = {"placement": strategy.output, "strategy": strategy}
    if strategy.localize is not None:
        strategy.localize(local, strategy, LocalContext(world, rank))
        if any(n.op == "call_function" and (n.target in comm.COLLECTIVES
                                            or getattr(n.target, "__module__", "") == comm.__name__)
               for n in new.nodes):
            return None
    return fx.GraphModule(torch.nn.Module(), new)


def _float(t) -> bool:
    return isinstance(t, torch.Tensor) and (t.is_floating_point() or t.is_complex())


_UNDEFINED_VALUES = {torch.ops.aten.empty_like.default}


def _expert_owners(op, tensors, world: int) -> dict:
    """Row owners of a ``D`` input: where the op is a grouped matmul, the rows of each rank's
    experts (a disjoint sum made by an upstream grouped matmul over the same ``offs``); else
    drawn at random per row count (``rank_pieces``)."""
    from autotp.passes.rules.moe import _is_grouped_mm
    if not (isinstance(op, torch._ops.OpOverload) and _is_grouped_mm(op)) or len(tensors) < 3:
        return {}
    rows, offs = tensors[0].shape[0], tensors[2]
    expert = torch.searchsorted(offs.long(), torch.arange(rows), right=True)     # expert of each row
    return {rows: expert // max(offs.numel() // world, 1)}


def check_strategy(op, graph, node, tensors, strategy, world: int, seed: int = 0):
    """None if the strategy holds on these inputs; else the message; or ("skip", reason)."""
    if _runtime_only(strategy.inputs) or _runtime_only(strategy.output):
        return ("skip", "token-local / dispatched rows (L, X): need the routing runtime")
    gen = torch.Generator().manual_seed(seed)
    owners = _expert_owners(op, tensors, world)
    pieces = [rank_pieces(t, p, world, gen, owners) for t, p in zip(tensors, strategy.inputs)]
    modules = [_local_module(graph, node, strategy, world, r) for r in range(world)]
    if any(m is None for m in modules):
        return ("skip", "localize inserts collectives (runtime)")
    full = node.meta["val"]
    if op in _UNDEFINED_VALUES:                     # only the shapes are defined
        full = torch.zeros_like(full)
        modules = [lambda *a, m=m: torch.zeros_like(m(*a)) for m in modules]
    outs = []
    for r in range(world):
        try:
            outs.append(modules[r](*[pc[r] for pc in pieces]))
        except Exception as e:  # noqa: BLE001 — the op rejecting its local pieces is a rule bug
            return f"rank {r} raised {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    fulls = full if isinstance(full, (tuple, list)) else (full,)
    placements = strategy.output if isinstance(strategy.output, tuple) else (strategy.output,)
    for i, (f, p) in enumerate(zip(fulls, placements)):
        if not isinstance(f, torch.Tensor) or p is None:
            continue
        local = [o[i] if isinstance(full, (tuple, list)) else o for o in outs]
        msg = check_output(f, local, p, world)
        if msg:
            return f"output {i}: {msg}" if len(fulls) > 1 else msg
    return None


def _backward_applies(full, strategy) -> bool:
    if not isinstance(full, torch.Tensor) or not full.is_floating_point():
        return False
    ps = (strategy.output,) + tuple(strategy.inputs)
    if any(p == D or isinstance(p, Grid) and p.outer in (P, D) for p in ps):
        return False                                 # disjoint rows: the runtime's expert path
    return strategy.output != R                      # all-R: nothing to reduce


def check_backward(op, graph, node, tensors, strategy, world: int, seed: int = 1):
    """Gradients of every float input: S -> this rank's piece of the full gradient, R -> a
    partial sum over ranks (the gradient all-reduce), P -> the full gradient on every rank."""
    gen = torch.Generator().manual_seed(seed)
    full_in = [t.detach().clone().requires_grad_(_float(t)) for t in tensors]
    modules = [_local_module(graph, node, strategy, world, r) for r in range(world)]
    full_out = fx.GraphModule(torch.nn.Module(), graph)(*full_in)
    if not full_out.requires_grad:
        return None
    g_out = torch.randn(full_out.shape, generator=gen, dtype=full_out.dtype)
    diff = [t for t in full_in if t.requires_grad]
    full_grads = torch.autograd.grad(full_out, diff, g_out, allow_unused=True)
    owners: dict = {}
    pieces = [rank_pieces(t, p, world, gen, owners) for t, p in zip(tensors, strategy.inputs)]
    grads = []
    for r in range(world):
        ins = [pc[r].detach().clone().requires_grad_(_float(pc[r])) for pc in pieces]
        out = modules[r](*ins)
        g = local_chunk(g_out, strategy.output, r, world) if strategy.output not in (P,) else g_out
        if (copies := _copies(strategy.output, g.ndim, world)) is not None:
            g = g / copies               # a group-replicated output's gradient: each rank of the group a share
        grads.append(torch.autograd.grad(out, [t for t in ins if t.requires_grad], g, allow_unused=True))
    placements = [p for t, p in zip(full_in, strategy.inputs) if t.requires_grad]
    for i, (fg, p) in enumerate(zip(full_grads, placements)):
        if fg is None:
            continue
        local = [gr[i] if gr[i] is not None else torch.zeros_like(pieces[0][0]) for gr in grads]
        want = P if p == R else R if p == P else p     # the gradient's placement
        if (copies := _copies(p, local[0].ndim, world)) is not None:     # partial over each group: summed
            local = [sum(torch.where(r // copies == q // copies, lq, 0.0) for q, lq in enumerate(local))
                     for r in range(world)]
        msg = check_output(fg, local, want, world)
        if msg:
            return f"grad of input {i} ({fmt(p)}): {msg}"
    return None


def _copies(p, ndim: int, world: int) -> torch.Tensor | None:
    """For a placement some of whose elements a group of ranks holds whole (kv heads: ``Grid(S(d), R,
    g)``, a ``Blocks`` of ``Sizes``), how many ranks hold each local element (1: this rank alone), as
    a tensor that broadcasts along the split dim; None for any other placement.  The gradient of
    such elements is a partial sum over their group (``placement.Grid``)."""
    if group_replicated(p):
        return torch.tensor(world // p.groups)
    if not (isinstance(p, Blocks) and p.grouped):
        return None
    counts = []
    for b, g in zip(p.sizes, groups_of(p.sizes)):
        counts += [1 if g is None else world // g] * (b // (world if g is None else g))
    return torch.tensor(counts).reshape([-1] + [1] * (ndim - 1 - p.dim % ndim))


def check_rule(op, sample_inputs, world: int, rule=None, backward: bool = True, factors=_FACTORS) -> Conformance:
    """Check every strategy ``rule`` (default: the registered one) offers for ``op`` on each
    sample ``(args, kwargs)`` of full tensors, at ``world`` simulated ranks.  ``factors``: the
    strided factors inputs are offered in (a tuple of block sizes offers ``Blocks`` on every dim
    of that size whose blocks divide by ``world``)."""
    from autotp.passes.rules import find_rule, tensor_inputs
    rule = rule or find_rule(op)
    if rule is None:
        raise ValueError(f"no sharding rule for {op}: register one (docs/adding-a-rule.md) or pass rule=")
    report = Conformance()
    name = str(op)
    for k, (args, kwargs) in enumerate(sample_inputs):
        graph, node, tensors = one_op_graph(op, args, kwargs)
        label = f"sample {k} " + ", ".join(str(tuple(t.shape)) for t in tensors)
        for strategy in strategies_of(rule, node, tensor_inputs(node), world, factors):
            desc = f"{fmt(tuple(strategy.inputs))} -> {fmt(strategy.output)}"
            if strategy.replicated:
                report.skipped["all-replicated (trivially the op itself)"] += 1
                continue
            result = check_strategy(op, graph, node, tensors, strategy, world, seed=k)
            if isinstance(result, tuple):
                report.skipped[result[1]] += 1
                continue
            report.ran += 1
            report.cases.add(desc)
            if result is None and backward and _backward_applies(node.meta["val"], strategy):
                try:
                    result = check_backward(op, graph, node, tensors, strategy, world, seed=k)
                    report.backward += 1
                except RuntimeError as e:                # an op without a derivative
                    if "derivative" not in str(e) and "does not require grad" not in str(e):
                        raise
            if result is not None:
                report.failures.append(Failure(name, desc, world, label, result))
    return report


# ---- OpInfo samples ----

def _packet_names(op) -> set[str]:
    base = op.name().split("::")[-1].split(".")[0].lstrip("_")
    names = {base}
    if base.endswith("_loss"):
        names.add(base[:-5])
    if base.endswith("_nd"):
        names.add(base[:-3])
    if base == "to_copy":
        names.add("to")
    return names


def _small(args, kwargs, limit: int = 4096) -> bool:
    flat, _ = pytree.tree_flatten((args, kwargs))
    ts = [t for t in flat if isinstance(t, torch.Tensor)]
    return bool(ts) and all(t.numel() <= limit for t in ts) and max(t.ndim for t in ts) >= 1


class _Record(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self, op):
        super().__init__()
        self.op, self.calls = op, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func == self.op:
            self.calls.append(pytree.tree_map(lambda a: a.detach().clone() if isinstance(a, torch.Tensor) else a,
                                              (args, kwargs)))
        return func(*args, **kwargs)


def opinfo_samples(op, limit: int = 3) -> list[tuple[tuple, dict]]:
    """Up to ``limit`` float32 CPU samples of ``op`` (an ATen overload) from torch's OpInfo
    database: the calls to ``op`` that running an OpInfo's samples makes (so a sample reaches
    the overload with the arguments ATen gives it), else the OpInfo's own arguments where the
    overload accepts them.  [] where torch has none (or its test helpers are not installed)."""
    if not isinstance(op, torch._ops.OpOverload):
        return []
    try:
        from torch.testing._internal.common_methods_invocations import op_db
    except ImportError:                                 # needs `expecttest`
        return []
    names = _packet_names(op)
    out = []
    for info in op_db:
        short = info.name.split(".")[-1].lstrip("_")
        if short not in names and info.aten_name not in names:
            continue
        if torch.float32 not in info.supported_dtypes("cpu"):
            continue
        for sample in info.sample_inputs("cpu", torch.float32, requires_grad=False):
            args, kwargs = (sample.input, *sample.args), dict(sample.kwargs)
            if not _small(args, kwargs):
                continue
            rec = _Record(op)
            try:
                with rec:
                    info.op(*args, **kwargs)
            except Exception:  # noqa: BLE001 — a sample this build rejects
                continue
            calls = [c for c in rec.calls if _small(*c)]
            if not calls:
                try:
                    op(*args, **kwargs)
                    calls = [(args, kwargs)]
                except Exception:  # noqa: BLE001
                    continue
            out.append(calls[0])
            if len(out) >= limit:
                return out
    return out
