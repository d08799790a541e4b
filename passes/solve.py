r"""solve: choose one strategy per node — the plan.

Formulation (an integer linear program, solved exactly by HiGHS through ``scipy.optimize.milp``)

Variables
    y[v,k] in {0,1}     node v runs strategy k                          (one per node)
    r[t,q,p] in [0,1]   tensor t, produced as q, is redistributed to p  (shared by its consumers)
    z[t] in [0,1]       replicated tensor t is used inside a sharded op (needs f: backward all-reduce)

Constraints
    (one)      sum_k y[v,k] = 1                                   for every node v
    (edge)     for every consumer slot (v,i) of t, transport variables e[q,p] in [0,1]:
               sum_p e[q,p] = X[t,q],  sum_q e[q,p] = Y[v,i,p]
               X[t,q] = sum of y[u,k] over producer strategies with output q,
               Y[v,i,p] = sum of y[v,k] over consumer strategies that need p at slot i
    (redist)   r[t,q,p] >= e[q,p] for q != p  (one redistribution serves every consumer)
    (never)    no e[q,p] where q cannot become p (anything -> Partial), nor for parameters
               whenever q != p: tensor parallelism moves activations, never weights
    (f)        z[t] >= sum of y[v,k] over strategies k of consumer v that take t replicated
               while sharding something else (their gradient for t is a partial sum)
    (outputs)  graph outputs are R (unless ``sharded_outputs``), except carried state (a KV
               cache, ``ctx.state_outputs``): X[out,q] = X[in,q], its input's placement, no move.
               With ``sharded_outputs`` an output stays where it is, except that a pending sum
               (P, D) is settled: one of R, its settled placements, or a shard of its last dim

Objective: the fastest plan within a weight-memory budget, in levels
    1. memory:  M* = min sum_k y[w,k] * bytes(w) * frac(k) over weight matrices w (parameters
       with >= 2 dims and >= 1/10 of the median matrix); frac(k) = the part of w one rank holds
       (1/N for a shard, 1/a for Grid(S(d), R, a), 1 replicated).
       The budget is B = M* + A, or the user's ``memory_budget`` (>= M*, else an error).
       A, the replication allowance, is what keeping whole kv heads
       costs: for every weight computing the k or v of an attention with H_kv < N kv heads
       (``rules/attention.kv_head_groups``), the bytes of its Grid(S(d), R, H_kv) strategy
       (replicated for MQA) minus its cheapest.  A = 0 on a model without such attention, so
       its plan is exactly the least-memory one, as before.  Levels 1b and 2 hold
       sum_k y[w,k] * bytes(w) * frac(k) <= B; when the plan found uses more than M*, a last
       level (3) minimises memory at its time, and the plan notes the bytes spent and the
       time saved against the best plan at M* (kv heads kept whole; ``memory_budget``).
   (1b. activations, with ``sequence_parallel``: minimise the bytes of every floating
       activation per rank, sum_k y[v,k] * bytes(v) / (N if k shards v's output else 1), plus
       the outputs of the redistributions r, with weight memory within the budget.  On a
       decoder this is Megatron-SP: norms and residual adds sharded along the sequence, each
       all-reduce split into a reduce-scatter and an all-gather.  With ``max_activation_mib``
       instead, the activation bytes are a constraint (<= the cap) on level 2, not a level:
       the fastest plan that fits, which splits the sequence only as far as the cap needs.)
    2. time:    minimise sum r[t,q,p] * T(q->p, t) + sum z[t] * T_allreduce(t) + eps * (#sharded ops)
       - sum g[t] * (T_allreduce(t) - T_reduce_scatter(t)) + sum_k y[v,k] * C(v,k)
       with memory within the budget.  (compute) C(v,k): the time of the matmul-class FLOPs
       (linear, attention, what ``torch.utils.flop_counter`` counts; ``passes/flops.py``) one
       rank runs for node v under strategy k — its inputs' local shapes — at the device's peak
       (``autotp.cost.compute_time``), x3 when v's gradient is computed: a replicated matmul
       pays for its repeated work.  Within the default budget this only orders plans of equal
       weight memory; it is what makes a larger ``memory_budget`` buy replication only where a
       collective costs more than the compute it repeats (on Llama-70B's shape at TP 8 the
       layers stay Megatron's: 2 all-reduces each).  g[t] <= z[t], g[t] <= [t is produced sharded]: a
       sharded tensor all-gathered for sharded consumers needs no all-reduce of its gradient,
       only a reduce-scatter (the fused gather's backward, ``comm.all_gather_rs``).  Only "large" weights count in 1 (``large_weights``):
       a small matrix such as a MoE router may stay replicated when splitting it would cost a
       collective per layer.  T is ``autotp.cost`` at the chosen link: forward
       collectives plus, when training, the backward ones (the transposes).

On a dense decoder layer the optimum is Megatron's: column-parallel q/k/v and gate/up
(f: one backward all-reduce each), row-parallel o/down (g: one forward all-reduce each).
"""
from __future__ import annotations

import time

import numpy as np
import torch
import torch.fx as fx
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import coo_matrix

from autotp.passes.context import AutoTPError, PassContext, module_path, node_layer
from autotp.cost import ALL_REDUCE, REDUCE_SCATTER, collective_time, compute_time, get_link
from autotp.passes.accounting import (activation_bytes, fraction, is_activation, large_weights, nbytes,
                                      planned_bytes, weights)
from autotp.passes.flops import counted, flops
from autotp.passes.redistribute import reduce_grad_time, transition_time
from autotp.passes.rules import tensor_inputs, val
from autotp.passes.rules.attention import ATTENTION_OPS
from autotp.passes.rules.views import RESHAPES
from autotp.placement import (D, P, S, Blocks, Grid, R, can_shard, fmt, group_replicated, groups_of, is_shard, is_strided,
                              splits)

_EPS = 1e-4          # microseconds per sharded op: prefer the plainer plan among equals
_GRID_EPS = 3        # per Grid placement: among equal plans the 1-D ones first (EP x TP where neither pure form divides)


class _ILP:
    def __init__(self):
        self.cost_mem, self.cost_time, self.cost_act, self.integral, self.ub = [], [], [], [], []
        self.rows, self.cols, self.data, self.lo, self.hi = [], [], [], [], []
        self.nrows = 0

    def var(self, mem=0.0, t=0.0, integral=True, act=0.0) -> int:
        self.cost_mem.append(mem); self.cost_time.append(t); self.cost_act.append(act)
        self.integral.append(1 if integral else 0)
        return len(self.cost_mem) - 1

    def row(self, coeffs: dict[int, float], lo: float, hi: float) -> None:
        for j, c in coeffs.items():
            self.rows.append(self.nrows); self.cols.append(j); self.data.append(c)
        self.lo.append(lo); self.hi.append(hi); self.nrows += 1

    def solve(self, objective: np.ndarray, extra=()):
        n = len(self.cost_mem)
        A = coo_matrix((self.data, (self.rows, self.cols)), shape=(self.nrows, n)).tocsr()
        cons = [LinearConstraint(A, np.array(self.lo), np.array(self.hi)), *extra]
        res = milp(objective, constraints=cons, integrality=np.array(self.integral), bounds=Bounds(0, 1),
                   options={"mip_rel_gap": 1e-9, "time_limit": 120})
        if res.x is None:
            raise AutoTPError(f"the placement solver found no plan ({res.message}); please report this model")
        return res.x


def _strided(s) -> int:
    """Strided (fused-layout) placements in a strategy: prefer plain shards among equals."""
    outs = s.output if isinstance(s.output, tuple) else (s.output,)
    return sum(1 for p in (*s.inputs, *outs) if p is not None and is_strided(p))


def _grids(s) -> float:
    """Placements on the 2-D (EP x TP) view of the mesh in a strategy, each weighted 1 + 1/groups:
    among equal grids the one with more expert groups (whole experts, wider matmuls) wins."""
    outs = s.output if isinstance(s.output, tuple) else (s.output,)
    return sum(1 + 1 / p.groups for p in (*s.inputs, *outs) if isinstance(p, Grid))


def _needs_grad(gm: fx.GraphModule, ctx: PassContext) -> set[fx.Node]:
    grad = set()
    for n in gm.graph.nodes:
        v = val(n)
        if n.op == "placeholder":
            if n.name in ctx.params and isinstance(v, torch.Tensor) and v.is_floating_point():
                grad.add(n)
        elif n.op == "call_function":
            float_out = (isinstance(v, torch.Tensor) and v.is_floating_point()) or (
                isinstance(v, (tuple, list)) and any(isinstance(x, torch.Tensor) and x.is_floating_point() for x in v))
            if float_out and any(a in grad for a in n.all_input_nodes):
                grad.add(n)
    return grad


def _signature(node: fx.Node) -> tuple:
    v = val(node)
    shape = tuple(v.shape) if isinstance(v, torch.Tensor) else None
    strategies = tuple((s.inputs, s.output) for s in node.meta["autotp"]["strategies"])
    return (node.op, str(node.target) if node.op != "placeholder" else "param", shape, strategies)


def tie_repeated_layers(nodes: list[fx.Node], ctx: PassContext) -> dict[fx.Node, fx.Node]:
    """Repeated decoder layers get one plan: node i of every layer whose op sequence (ops,
    shapes, strategies) equals another's shares that layer's decision variables.  The ILP
    then branches over one layer instead of L, and the plan is the same for every layer —
    as Megatron's is.  Returns node -> representative node."""
    layers: dict[int, list[fx.Node]] = {}
    for n in nodes:
        k = node_layer(n, ctx.params)
        if k is not None:
            layers.setdefault(k, []).append(n)
    first_of: dict[tuple, list[fx.Node]] = {}
    tied = {}
    for k in sorted(layers):
        sig = tuple(_signature(n) for n in layers[k])
        rep = first_of.setdefault(sig, layers[k])
        if rep is not layers[k]:
            tied.update(zip(layers[k], rep))
    return tied


def solve(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    """Choose one strategy per node (the formulation is the module's docstring)."""
    t0 = time.perf_counter()
    problem = _Problem(gm, ctx)
    problem.one_strategy_per_node()
    problem.edges()
    problem.outputs()
    x, stats = problem.solve_levels()
    problem.apply(x)
    ctx.solver_stats = {**stats, "seconds": time.perf_counter() - t0}
    return gm


class _Problem:
    """The ILP of one graph, built constraint group by constraint group (the names of the module's
    docstring): ``one_strategy_per_node`` (one), ``edges`` (edge, redist, never, f), ``outputs``
    (outputs); ``solve_levels`` runs the objective's levels, ``apply`` writes the plan."""

    def __init__(self, gm: fx.GraphModule, ctx: PassContext):
        self.gm, self.ctx, self.lp = gm, ctx, _ILP()
        self.grad = _needs_grad(gm, ctx) if ctx.training else set()
        self.weight_like = weights(gm, ctx)
        self.nodes = [n for n in gm.graph.nodes if n.meta.get("autotp", {}).get("strategies")]
        self.tied = tie_repeated_layers(self.nodes, ctx)
        self.large = large_weights(self.nodes, ctx)
        self.y: dict[fx.Node, list[int]] = {}        # node -> its strategies' variables
        self.redist: dict[tuple, int] = {}           # (tensor, q, p) -> r[t,q,p]
        self.freduce: dict = {}                      # tensor -> z[t]
        self.seen_edges: set = set()
        self.gathered_into: dict = {}                # reshape node -> variables "its input was gathered"
        self.instances: dict = {}                    # canonical tensor -> the real tensors it stands for
        self.unit_cost: dict = {}                    # variable id -> (tensor, cost of one instance, MiB)

    # ---- (one): sum_k y[v,k] = 1, with each strategy's weight bytes, eps and activation bytes

    def one_strategy_per_node(self) -> None:
        lp, ctx, world, link = self.lp, self.ctx, self.ctx.world, self.ctx.link
        for n in self.nodes:
            v = val(n)
            rep = self.tied.get(n)
            ids = self.y[rep] if rep is not None else []
            count_act = ctx.activation_terms and is_activation(n, self.weight_like, n in self.grad or not ctx.training)
            whole = flops(n, ctx.plan_sizes) if counted(n) else 0.0
            for k, s in enumerate(n.meta["autotp"]["strategies"]):
                mem = nbytes(v) * fraction(v, s.output, world) if n in self.large else 0.0
                eps = 0.0 if s.replicated else _EPS * (1 + _strided(s) + _GRID_EPS * _grids(s))
                if whole:                                   # (compute) this rank's share of the node's work
                    eps += self.compute_us(n, whole) * flops(n, ctx.plan_sizes, s.inputs, world) / whole
                if n.op == "placeholder" and n in self.grad and group_replicated(s.output):
                    # its gradient is summed over the group, in one bucket with the others: bytes, no latency
                    b = world // s.output.groups
                    eps += (reduce_grad_time(nbytes(v) / s.output.groups, b, link) - get_link(link).latency) * 1e6 \
                        if b > 1 else 0.0
                act = activation_bytes(n, s.output, ctx) if count_act else 0.0
                if rep is None:
                    ids.append(lp.var(mem=mem, t=eps, act=act))
                else:
                    lp.cost_mem[ids[k]] += mem
                    lp.cost_time[ids[k]] += eps
                    lp.cost_act[ids[k]] += act
            self.y[n] = ids
            if rep is None:
                lp.row({j: 1.0 for j in ids}, 1.0, 1.0)

    def compute_us(self, n: fx.Node, whole: float) -> float:
        """Microseconds of ``whole`` forward FLOPs of ``n`` at the device's peak, x3 when its
        gradient is computed too (the two backward matmuls).  The dtype is the inputs' (an
        attention kernel such as ``_scaled_dot_product_efficient_attention`` returns a tuple)."""
        steps = 3 if self.ctx.training and n in self.grad else 1
        return compute_time(whole * steps, val(tensor_inputs(n)[0]).dtype, self.ctx.device) * 1e6

    def producer_options(self, t: fx.Node) -> dict:
        """placement q -> variable ids whose choice makes t come out as q."""
        alias = t.meta.get("autotp", {}).get("alias_of")
        out: dict = {}
        if alias is not None:
            root, idx = alias
            for k, s in enumerate(root.meta["autotp"]["strategies"]):
                out.setdefault(s.output[idx], []).append(self.y[root][k])
            return out
        for k, s in enumerate(t.meta["autotp"]["strategies"]):
            out.setdefault(s.output, []).append(self.y[t][k])
        return out

    def canon(self, n: fx.Node):
        """The representative of ``n`` under layer tying (getitems by their root's)."""
        alias = n.meta.get("autotp", {}).get("alias_of")
        if alias is not None:
            return ("item", self.canon(alias[0]), alias[1])
        return self.tied.get(n, n)

    # ---- (edge), (redist), (never), (f): every consumer slot of every tensor

    def edges(self) -> None:
        for v in self.nodes:
            if v.op == "placeholder":
                continue
            strategies = v.meta["autotp"]["strategies"]
            for i, t in enumerate(tensor_inputs(v)):
                need: dict = {}
                sharded = []
                for k, s in enumerate(strategies):
                    need.setdefault(s.inputs[i], []).append(self.y[v][k])
                    if s.inputs[i] == R and not s.replicated:
                        sharded.append(self.y[v][k])
                self.consume(t, need, sharded, v=v, i=i)

    def consume(self, t: fx.Node, need: dict, sharded_use: list[int], fixed: bool = False, v=None, i=0) -> None:
        """Consumer slot needs placement p when any var in need[p] is 1 (``fixed``: need is a
        constant requirement, not variables).  Transport formulation of the edge: e[q,p] is
        "t comes as q and goes as p"; rows: sum_p e[q,p] = X[q], sum_q e[q,p] = Y[p].  Its LP
        relaxation is tight on trees, which keeps HiGHS from branching much."""
        lp, ctx, world, link = self.lp, self.ctx, self.ctx.world, self.ctx.link
        info = t.meta.get("autotp", {})
        if not info.get("strategies") and "alias_of" not in info:
            return
        ct = self.canon(t)
        self.instances.setdefault(ct, set()).add(t)
        edge = (ct, self.canon(v) if v is not None else "output", i)
        if edge in self.seen_edges:       # a tied layer's copy of an edge: same rows, skip
            return
        self.seen_edges.add(edge)
        gathers = []                      # variables "t arrives here gathered from a shard"
        have = self.producer_options(t)
        size = planned_bytes(t, ctx)
        is_param = t in self.weight_like
        e: dict[tuple, int] = {}
        for q in have:
            for p in need:
                if q == p:
                    e[q, p] = lp.var(integral=False)
                    continue
                # (never) a weight arrives in its placement, never redistributed; except that a
                # replicated one may be sliced where FSDP2 forbids the shard itself (ctx.dp_sharded:
                # a fused bias whose shard would be strided), its gradient gathered in backward
                sliced = ctx.dp_sharded and q == R and is_shard(p)
                cost = None if is_param and not sliced else transition_time(q, p, size, world, link, t in self.grad)
                if cost is None:
                    continue
                e[q, p] = lp.var(integral=False)
                if is_shard(q) and p == R:
                    gathers.append(e[q, p])
                key = (ct, q, p)
                if key not in self.redist:   # (redist) one redistribution serves every consumer
                    act = size / (world if splits(p) else 1) / 2**20 if ctx.activation_terms and size else 0.0
                    self.redist[key] = lp.var(integral=False)
                    self.unit_cost[self.redist[key]] = (ct, cost * 1e6, act)
                lp.row({self.redist[key]: 1.0, e[q, p]: -1.0}, 0.0, np.inf)
        for q, qvars in have.items():
            row = {e[q, p]: 1.0 for p in need if (q, p) in e}
            for j in qvars:
                row[j] = row.get(j, 0.0) - 1.0
            lp.row(row, 0.0, 0.0)
        for p, pvars in need.items():
            row = {e[q, p]: 1.0 for q in have if (q, p) in e}
            if fixed:
                lp.row(row, 1.0, 1.0)
                continue
            for j in pvars:
                row[j] = row.get(j, 0.0) - 1.0
            lp.row(row, 0.0, 0.0)
        if v is not None and v.target in RESHAPES:
            self.gathered_into[v] = gathers + self.gathered_into.get(t, [])
        if sharded_use and t in self.grad:
            self.grad_reduction(t, ct, have, size, sharded_use)

    def grad_reduction(self, t: fx.Node, ct, have: dict, size: float, sharded_use: list[int]) -> None:
        """(f) z[t] >= the strategies that take t replicated while sharding something else; g[t]:
        gathered from a shard, the backward is a reduce-scatter instead of an all-reduce."""
        lp, world, link = self.lp, self.ctx.world, self.ctx.link
        if ct not in self.freduce:
            self.freduce[ct] = f = lp.var(integral=False)
            self.unit_cost[f] = (ct, reduce_grad_time(size, world, link) * 1e6, 0.0)
            # t is produced sharded (then gathered), or is a reshape of a gathered tensor
            sharded_in = [j for q, qvars in have.items() if is_shard(q) for j in qvars] + \
                self.gathered_into.get(t, [])
            if sharded_in:
                g = lp.var(integral=False)
                saving = collective_time(ALL_REDUCE, size, world, link) - \
                    collective_time(REDUCE_SCATTER, size, world, link)
                self.unit_cost[g] = (ct, -saving * 1e6, 0.0)
                lp.row({g: 1.0, f: -1.0}, -np.inf, 0.0)
                lp.row({g: 1.0, **{j: -1.0 for j in sharded_in}}, -np.inf, 0.0)
        lp.row({self.freduce[ct]: 1.0, **{j: -1.0 for j in sharded_use}}, 0.0, np.inf)

    # ---- (outputs)

    def outputs(self) -> None:
        out_node = next(n for n in self.gm.graph.nodes if n.op == "output")
        carried = tie_state_outputs(self.lp, out_node, self.ctx, self.producer_options)
        self.settled_outputs = {}
        for t in out_node.all_input_nodes:
            if not isinstance(val(t), torch.Tensor) or t in carried:
                continue
            if not self.ctx.sharded_outputs:
                self.consume(t, {R: []}, [], fixed=True, i=t.name)       # outputs come back replicated
                continue
            info = t.meta.get("autotp", {})
            have = self.producer_options(t) if info.get("strategies") or "alias_of" in info else {}   # as consume
            if any(q in (P, D) for q in have):       # a pending sum is settled: kept where it is
                self.settled_outputs[t] = self.settle(t, have)   # sharded, or summed into a shard
        for j, (ct, cost, act) in self.unit_cost.items():      # every tied layer pays its own collectives
            self.lp.cost_time[j] += cost * len(self.instances[ct])
            self.lp.cost_act[j] += act * len(self.instances[ct])

    def settle(self, t: fx.Node, have: dict) -> dict:
        """(outputs, ``sharded_outputs``) An output the plan may leave sharded must not come back as
        a pending sum (P, D): a caller can use a shard (logits split by vocab for
        ``autotp.cross_entropy`` or the decode step), not partial sums.  One choice among its
        settled placements, R, and a shard of its last dim (a reduce-scatter from a sum):
        placement -> its selector variable."""
        v = val(t)
        options = [q for q in have if q not in (P, D)] + [R]
        if v.ndim and can_shard(v.shape[-1], 1, self.ctx.world):
            options.append(S(v.ndim - 1))
        choice = {q: self.lp.var(integral=False) for q in dict.fromkeys(options)}
        self.lp.row({j: 1.0 for j in choice.values()}, 1.0, 1.0)
        self.consume(t, {q: [j] for q, j in choice.items()}, [], i=t.name)
        return choice

    # ---- the objective's levels

    def solve_levels(self) -> tuple[np.ndarray, dict]:
        lp, ctx = self.lp, self.ctx
        mem, acost, tcost = np.array(lp.cost_mem), np.array(lp.cost_act), np.array(lp.cost_time)
        best_mem = float(mem @ lp.solve(mem))                              # 1. memory
        budget = best_mem + _replication_allowance(self.nodes, self.large, self.y, self.tied, lp)
        if ctx.memory_budget is not None:
            budget = self._user_budget(best_mem)
        keep = [LinearConstraint(mem.reshape(1, -1), -np.inf, budget * (1 + 1e-9) + 0.5)]
        x = None
        if ctx.max_activation_mib is not None and not ctx.sequence_parallel:
            try:                              # the fastest plan under the cap
                x = lp.solve(tcost, keep + [LinearConstraint(acost.reshape(1, -1), -np.inf, ctx.max_activation_mib)])
            except AutoTPError:
                ctx.note(f"no plan keeps activations under {ctx.max_activation_mib:.1f} MiB per rank at the planning "
                         f"sizes: planned for the least activation memory instead (sequence parallelism)")
        if x is None:
            if ctx.activation_terms:                                        # 1b. activations
                best_act = float(acost @ lp.solve(acost, keep))
                keep.append(LinearConstraint(acost.reshape(1, -1), -np.inf, best_act * (1 + 1e-7) + 1e-3))
            x = lp.solve(tcost, keep)                                       # 2. time
        if float(mem @ x) > best_mem * (1 + 1e-9) + 0.5:                   # 3. the least memory at that time
            x = lp.solve(mem, keep + [LinearConstraint(tcost.reshape(1, -1), -np.inf, float(tcost @ x) * (1 + 1e-7) + 1e-6)])
        self.saved_us = self._kv_saving(x, tcost, keep)
        if ctx.memory_budget is not None:
            self._budget_note(x, mem, tcost, best_mem)
        return x, {"variables": len(lp.cost_mem), "constraints": lp.nrows,
                   "weight_bytes_per_rank": float(mem @ x), "weight_bytes_min": best_mem,
                   "weight_bytes_budget": budget, "comm_time_us": float(tcost @ x),
                   "activation_mib_per_rank": float(acost @ x) if ctx.activation_terms else None}

    def _user_budget(self, best_mem: float) -> float:
        """``memory_budget`` (weight bytes per rank), checked against the least any plan needs."""
        if self.ctx.memory_budget < best_mem:
            raise AutoTPError(f"memory_budget={self.ctx.memory_budget:,.0f} bytes is below the least weight memory per "
                              f"rank any plan of this model needs on {self.ctx.world} ranks ({best_mem:,.0f} bytes of its "
                              f"large weights): raise it, or use more ranks")
        return float(self.ctx.memory_budget)

    def _budget_note(self, x, mem, tcost, best_mem: float) -> None:
        """With ``memory_budget``: what the plan spends above the least-memory plan, and the time
        it saves against the fastest plan at that least memory."""
        used = float(mem @ x)
        if used <= best_mem * (1 + 1e-9) + 0.5:
            self.ctx.note(f"memory_budget {self.ctx.memory_budget / 2**20:,.1f} MiB of weights per rank: the plan uses "
                          f"the least, {used / 2**20:,.1f} MiB (no replication pays for itself)")
            return
        least = self.lp.solve(tcost, [LinearConstraint(mem.reshape(1, -1), -np.inf, best_mem * (1 + 1e-9) + 0.5)])
        self.ctx.note(f"memory_budget {self.ctx.memory_budget / 2**20:,.1f} MiB of weights per rank: the plan uses "
                      f"{used / 2**20:,.1f} MiB (least {best_mem / 2**20:,.1f} MiB) and saves "
                      f"{float(tcost @ least) - float(tcost @ x):,.1f} us of communication and compute per step "
                      f"against the fastest least-memory plan")

    def _kv_saving(self, x, tcost, keep) -> float | None:
        """What keeping kv heads whole saves against the best plan that keeps none whole (None when
        the plan keeps none, or no such plan exists: placements pinned by the user)."""
        self.whole = _whole_kv_heads(self.nodes, self.y, x)
        if not self.whole:
            return None
        try:
            split = self.lp.solve(tcost, keep + [LinearConstraint(_indicator(self.whole, len(tcost)), 0, 0)])
        except AutoTPError:
            return None
        return float(tcost @ split) - float(tcost @ x)

    # ---- the plan

    def apply(self, x) -> None:
        ctx, world = self.ctx, self.ctx.world
        for n in self.gm.graph.nodes:
            n.meta.setdefault("autotp", {})["grad"] = n in self.grad or not ctx.training
        for n in self.nodes:
            s = n.meta["autotp"]["strategies"][int(np.argmax([x[j] for j in self.y[n]]))]
            n.meta["autotp"]["strategy"] = s
            n.meta["autotp"]["placement"] = s.output
        for n in self.gm.graph.nodes:
            alias = n.meta.get("autotp", {}).get("alias_of")
            if alias is not None and "strategy" in alias[0].meta.get("autotp", {}):
                n.meta["autotp"]["placement"] = alias[0].meta["autotp"]["strategy"].output[alias[1]]
        out_node = next(n for n in self.gm.graph.nodes if n.op == "output")
        out_node.meta.setdefault("autotp", {})["settled"] = {     # by name: the graph is copied for rewriting
            t.name: max(choice, key=lambda q: x[choice[q]]) for t, choice in self.settled_outputs.items()}
        for n in sorted(self.large, key=lambda n: n.name):
            if n.meta["autotp"]["placement"] == R and n not in self.tied and world > 1 \
                    and ctx.params[n.name] not in ctx.pins:
                ctx.note(f"{ctx.params[n.name]} {list(val(n).shape)} stays replicated: no split of it by {world} "
                         f"keeps its consumers local (sizes do not divide, or an op on it has no sharding rule)")
        if self.whole:
            _note_kv_replication(self.nodes, ctx, self.saved_us)
        if world > 1:
            _note_replicated_attention(self.nodes, self.tied, ctx)


def _note_replicated_attention(nodes, tied, ctx: PassContext) -> None:
    """An attention run whole on every rank (its inputs gathered) says why: its heads."""
    for n in nodes:
        if n in tied or n.op != "call_function" or str(n.target) not in ATTENTION_OPS:
            continue
        if not n.meta["autotp"]["strategy"].replicated:
            continue
        q, k = val(n.args[0]), val(n.args[1])
        if q.ndim != 4:
            continue
        hq, hkv, world = q.shape[1], k.shape[1], ctx.world
        why = (f"{hq} query heads do not divide by {world} ranks" if hq % world else
               f"its {hkv} kv heads neither divide by {world} ranks nor divide {world}" if hkv % world and world % hkv
               else "splitting its heads costs more than gathering q, k and v at these sizes")
        ctx.note(f"attention `{n.name}` ({module_path(n) or 'the model'}) runs whole on every rank, all its heads "
                 f"(q, k and v whole: gathered, or computed whole where weights are replicated): {why} (each rank "
                 f"must hold whole heads; unequal head blocks are not supported yet)")
        return                            # the layers repeat it: once is enough


def _keeps_kv_heads_whole(n: fx.Node, s) -> bool:
    """Whether strategy ``s`` of parameter ``n`` keeps whole kv heads (``kv_groups``: the kv head
    counts of the attentions it computes k or v for): Grid(S(d), R, H_kv), or replicated for MQA."""
    groups = n.meta["autotp"].get("kv_groups") or ()
    return group_replicated(s.output) and s.output.groups in groups or s.output == R and 1 in groups \
        or _fused_kv(s.output)


def _fused_kv(p) -> bool:
    """A fused ``[q | k | v]`` parameter split per block with its k and v blocks whole on groups of
    ranks (``Blocks`` of ``placement.Sizes``; offered only to weights computing k or v)."""
    return isinstance(p, Blocks) and p.grouped


def _whole_kv_heads(nodes, y, x) -> list[int]:
    """Every variable that keeps whole kv heads on groups of ranks, when the plan ``x`` chose one;
    else []."""
    ids = {j for n in nodes if n.meta["autotp"].get("kv_groups")
           for s, j in zip(n.meta["autotp"]["strategies"], y[n]) if _keeps_kv_heads_whole(n, s)}
    return sorted(ids) if any(x[j] > 0.5 for j in ids) else []


def _indicator(ids: list[int], n: int) -> np.ndarray:
    row = np.zeros((1, n))
    row[0, ids] = 1.0
    return row


def _note_kv_replication(nodes, ctx: PassContext, saved_us: float | None) -> None:
    """Say which k/v weights keep whole kv heads on groups of ranks, what it costs in weight bytes
    per rank (against their least-memory split) and saves in communication (``saved_us``, against
    the fastest plan that keeps no kv head whole)."""
    whole, extra = [], 0.0
    for n in nodes:
        p = n.meta["autotp"].get("placement")
        if not n.meta["autotp"].get("kv_groups") or not _keeps_kv_heads_whole(n, n.meta["autotp"]["strategy"]):
            continue
        least = min(fraction(val(n), s.output, ctx.world) for s in n.meta["autotp"]["strategies"])
        extra += nbytes(val(n)) * (fraction(val(n), p, ctx.world) - least)
        whole.append(n)
    p = whole[0].meta["autotp"]["placement"]
    groups = p.groups if isinstance(p, Grid) else max((g for g in groups_of(p.sizes) if g), default=1) \
        if _fused_kv(p) else 1
    copies = ctx.world // groups
    names = ", ".join(ctx.params[n.name] for n in whole[:2]) + (", ..." if len(whole) > 2 else "")
    saves = "" if saved_us is None else (f", saves {saved_us:.1f} us of communication per step at "
                                         f"{get_link(ctx.link).name} against the best plan that keeps no kv head whole")
    ctx.note(f"k/v heads replicated x{copies} over the ranks whose query heads read them ({len(whole)} weights: "
             f"{names}; {fmt(p)}), as vLLM and Megatron do: +{extra / 2**20:.2f} MiB of weights per rank{saves}")


def _replication_allowance(nodes, large, y, tied, lp: _ILP) -> float:
    """Weight bytes per rank the plan may spend above the minimum: what replicating kv heads over
    the ranks that read them costs — for each large weight computing the k or v of an attention
    with fewer kv heads than ranks (``kv_groups``, from ``rules/attention.kv_head_groups``), its
    dearest strategy that keeps whole kv heads (``Grid(S(d), R, H_kv)``; replicated for MQA)
    minus its cheapest, every tied layer counted.  Zero for a model without such weights, whose
    plan is then exactly the least-memory one."""
    total = 0.0
    for n in nodes:
        groups = n.meta["autotp"].get("kv_groups")
        if not groups or n not in large or n in tied:
            continue
        costs = [lp.cost_mem[j] for j in y[n]]
        strategies = n.meta["autotp"]["strategies"]
        # a fused [q|k|v]: what its k and v blocks cost whole on their groups, not the whole weight's copies
        fused = any(_fused_kv(s.output) for s in strategies)
        whole = [c for s, c in zip(strategies, costs) if (_fused_kv(s.output) if fused else _keeps_kv_heads_whole(n, s))]
        if whole:
            total += max(whole) - min(costs)
    return total


def tie_state_outputs(lp: _ILP, out_node: fx.Node, ctx: PassContext, producer_options) -> set[fx.Node]:
    """Outputs that are the new value of a carried input (``ctx.state_outputs``: a KV cache)
    come out in exactly that input's placement, so the state never moves between steps:
    X[out, q] = X[input, q] for every placement q (``producer_options``: q -> variables).
    Returns those outputs; they are exempt from "outputs come back replicated"."""
    if not ctx.state_outputs:
        return set()
    outs = tensor_inputs(out_node)
    inputs = {n.name: n for n in out_node.graph.nodes if n.op == "placeholder"}
    carried = set()
    for slot, name in ctx.state_outputs.items():
        t, src = outs[slot], inputs[name]
        if not all(n.meta.get("autotp", {}).get("strategies") or "alias_of" in n.meta.get("autotp", {})
                   for n in (t, src)):
            continue
        have, want = producer_options(t), producer_options(src)
        for q in set(have) | set(want):
            row: dict = {}
            for j in have.get(q, []):
                row[j] = row.get(j, 0.0) + 1.0
            for j in want.get(q, []):
                row[j] = row.get(j, 0.0) - 1.0
            lp.row(row, 0.0, 0.0)
        carried.add(t)
    return carried
