"""The plan: what the solver chose, as data a person can read, diff and change."""
from __future__ import annotations

import collections
import dataclasses
import fnmatch
import hashlib

import torch
import torch.fx as fx

from autotp.capture import Captured, capture, concrete
from autotp.placement import D, R, P, X, Grid, Placement, fmt, group_replicated, is_shard, is_strided, local_shape, split_factor
from autotp.passes import PLAN_PASSES, REWRITE_PASSES, PassContext, run_passes
from autotp.base import AutoTPError, layer_index, module_path, user_line
from autotp.passes.rules import tensor_inputs, val
from autotp.passes.rules.views import WEIGHT_VIEWS
from autotp.program import copy_graph_module, static_size



@dataclasses.dataclass
class Collective:
    """One collective of the rewritten graph."""
    node: str
    kind: str                      # comm function: all_reduce, reduce_grad, all_gather, ...
    forward: str | None            # collective run in forward (None: none)
    backward: str | None           # collective run in backward (None: none)
    shape: tuple                   # full (global) shape of the tensor moved, at the example's sizes
    sym_shape: tuple               # the same with sympy ``batch`` / ``seq`` where the size varies
    dtype: torch.dtype
    module: str
    source: str
    reason: str
    volume: int = 1                # bytes moved / the tensor's: N/groups copies for a grid dispatch

    @property
    def nbytes(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n * self.dtype.itemsize

    @property
    def sym_bytes(self):
        """Bytes as a sympy expression in ``batch`` and ``seq``."""
        import sympy
        n = sympy.Integer(self.dtype.itemsize)
        for s in self.sym_shape:
            n = n * s
        return n

    @property
    def layer(self) -> int | None:
        return layer_index(self.module)


class Plan:
    """A tensor-parallel plan for one model, example input and world size.

    ``Plan.placements`` maps each parameter name to its placement; ``collectives()`` lists
    every collective with where it sits and why; ``graph_text()`` is the rewritten graph as
    readable text (the golden-graph format).
    """

    def __init__(self, captured: Captured, ctx: PassContext, gm: fx.GraphModule, aliases: dict[str, list[str]]):
        self.captured, self.ctx, self.gm = captured, ctx, gm
        self.world = ctx.world
        self.aliases = aliases                   # parameter name -> every name it is known by (tied)
        self._rewritten = None
        self._snapshots = None

    # ---- reading the plan ----
    def _parameters(self):
        """(parameter name, its placeholder) for every name a parameter is known by (tied ones too)."""
        for node in self.gm.graph.nodes:
            if node.op == "placeholder" and node.name in self.ctx.params:
                for name in self.aliases.get(self.ctx.params[node.name], [self.ctx.params[node.name]]):
                    yield name, node

    @property
    def placements(self) -> dict[str, Placement]:
        return {name: node.meta["autotp"]["placement"] for name, node in self._parameters()}

    def check_fits(self, model: torch.nn.Module, world: int, dp_sharded: bool) -> None:
        """A plan made beforehand fits ``model`` on ``world`` ranks, or a clear error: the same
        parameter names and shapes, the same world size, and planned for the same kind of mesh."""
        if world != self.world:
            raise AutoTPError(f"the plan given to parallelize was made for {self.world} ranks, the mesh has {world}: "
                              f"plan with autotp.plan(..., world_size={world})")
        if dp_sharded != self.ctx.dp_sharded:
            kind = {True: "the tp dim of a larger mesh (FSDP2)", False: "a tp-only mesh"}
            raise AutoTPError(f"the plan given to parallelize was made for {kind[self.ctx.dp_sharded]}, this mesh is "
                              f"{kind[dp_sharded]}: let parallelize plan (plan=None)")
        want = {name: tuple(val(node).shape) for name, node in self._parameters()}
        have = {name: tuple(p.shape) for name, p in model.named_parameters(remove_duplicate=False)}
        if want != have:
            diff = sorted(n for n in set(want) | set(have) if want.get(n) != have.get(n))
            raise AutoTPError(f"the plan given to parallelize was made for another model: parameters "
                              f"{', '.join(f'{n} (plan {want.get(n)}, model {have.get(n)})' for n in diff[:3])}"
                              f"{' ...' if len(diff) > 3 else ''} differ; plan this model")

    def roles(self) -> dict[str, str]:
        """Parameter name -> column-parallel / row-parallel / vocab-parallel / expert-parallel /
        replicated / sharded (anything else)."""
        roles = {}
        for node in self.gm.graph.nodes:
            if node.op != "placeholder" or node.name not in self.ctx.params:
                continue
            p = node.meta["autotp"]["placement"]
            role = "replicated"
            if group_replicated(p):           # kv heads: split over groups of ranks, whole inside each
                role = f"column-parallel by kv head, replicated x{self.world // p.groups}"
            elif isinstance(p, Grid):
                user = _compute_user(node)
                s = user.meta.get("autotp", {}).get("strategy") if user is not None else None
                kind = "row" if s is not None and s.output == P else "column"
                role = f"expert-parallel x {kind}-parallel ({p.groups}x{self.world // p.groups})"
            elif is_shard(p):
                role = f"sharded {fmt(p)}"
                user = _compute_user(node)
                s = user.meta.get("autotp", {}).get("strategy") if user is not None else None
                if s is not None and not isinstance(s.output, tuple):
                    if s.output == P:
                        role = "vocab-parallel" if user.target == torch.ops.aten.embedding.default else "row-parallel"
                    elif s.output == D:
                        role = "expert-parallel"
                    elif s.output == X:
                        role = "expert-parallel (all-to-all)"
                    elif is_shard(s.output):
                        role = "column-parallel"
            for name in self.aliases.get(self.ctx.params[node.name], [self.ctx.params[node.name]]):
                roles[name] = role
        return roles

    @property
    def notes(self) -> list[str]:
        return list(self.ctx.notes)

    def rewritten(self, rank: int = 0, group: str = "tp") -> fx.GraphModule:
        """A copy of the graph with collectives inserted and shapes made local for ``rank``."""
        if rank == 0 and group == "tp" and self._rewritten is not None:
            return self._rewritten
        gm = copy_graph_module(self.gm, lazy=True)     # the passes' recompile()s only mark it stale
        gm = run_passes(REWRITE_PASSES, gm, dataclasses.replace(self.ctx, rank=rank, group=group))
        gm = fx.GraphModule(gm, gm.graph)                # a plain GraphModule: its code generated once
        if rank == 0 and group == "tp":
            self._rewritten = gm
        return gm

    def snapshots(self) -> list[tuple[str, fx.GraphModule]]:
        """(pass name, the graph after it) for each rewrite pass, on rank 0: what ``viz`` and the
        dumps draw (``passes.run_passes``)."""
        if self._snapshots is None:
            self._snapshots = []
            run_passes(REWRITE_PASSES, copy_graph_module(self.gm, lazy=True),
                       dataclasses.replace(self.ctx, rank=0, group="tp"), self._snapshots)
        return self._snapshots

    def collectives(self) -> list[Collective]:
        out = []
        for node in self.rewritten().graph.nodes:
            info = node.meta.get("autotp", {})
            if "collective" not in info:
                continue
            v = val(node)
            out.append(Collective(node.name, info["collective"], info["forward"], info["backward"],
                                  tuple(v.shape), self._sym_shape(node), v.dtype, module_path(node),
                                  user_line(node), info["reason"], info.get("volume", 1)))
        return out

    def _sym_shape(self, node: fx.Node) -> tuple:
        import sympy
        v = node.meta.get("val")
        out = []
        for s in v.shape:
            if isinstance(s, torch.SymInt):
                out.append(sympy.sympify(s.node.expr).xreplace(self.captured.symbols))
            else:
                out.append(sympy.Integer(s))
        return tuple(out)

    def activation_mib(self) -> float:
        """Activation memory per rank (MiB) at the planning batch and sequence, as the solver
        counts it: every tensor the forward allocates that backward may keep and every
        redistribution's output, 1/N of it where the plan shards it.  What
        ``sequence_parallel=True`` minimises and ``max_activation_bytes`` caps."""
        from autotp.passes.accounting import activation_mib
        return activation_mib(self.gm, self.ctx)

    def memory(self, batch: int, seq: int, dtype: torch.dtype = torch.bfloat16, optimizer: str | None = "adamw",
               dp: int = 1, activation_checkpointing: str | None = None, device_gb: float = 80.0,
               master_dtype: torch.dtype | None = None):
        """Per-rank peak memory of a training step and its parts (``autotp.memory.MemoryEstimate``):
        parameters, gradients and optimizer state (sharded over ``dp`` by FSDP2 per layer), the
        activations this rank's program keeps (run on the meta device at ``batch`` x ``seq``,
        checkpointed as asked), the largest transients, and whether it fits ``device_gb``.
        ``master_dtype``: the sharded parameters', gradients' and optimizer state's dtype (fp32
        master weights under mixed precision; default ``dtype``)."""
        from autotp.memory import estimate
        return estimate(self, batch, seq, dtype, optimizer, dp, activation_checkpointing, device_gb,
                        master_dtype=master_dtype)

    def size_divisors(self) -> list[tuple]:
        """``(size expression, divisor, node, placement)`` for every tensor the plan splits along a
        symbolic dim (sequence parallelism splits ``seq``): at run time that size must divide by
        ``N x factor``, or the shards would be uneven."""
        out, seen = [], set()
        for node in self.gm.graph.nodes:
            placements = node.meta.get("autotp", {}).get("placement")
            v = node.meta.get("val")
            vs, ps = (v, placements) if isinstance(placements, tuple) else ((v,), (placements,))
            for t, p in zip(vs, ps):
                if not (isinstance(t, torch.Tensor) and p is not None and is_shard(p) and p.dim < t.ndim):
                    continue
                size = t.shape[p.dim]
                if isinstance(size, torch.SymInt) and size.node.expr.free_symbols:
                    key = (size.node.expr, self.world * split_factor(p))
                    if key not in seen:
                        seen.add(key)
                        out.append((*key, node, p))
        return out

    def counts(self) -> dict:
        """{'forward': Counter(kind), 'backward': Counter(kind), 'per_layer_forward': {layer: Counter}}"""
        fwd, bwd, per_layer = collections.Counter(), collections.Counter(), collections.defaultdict(collections.Counter)
        for c in self.collectives():
            if c.forward:
                fwd[c.forward] += 1
                per_layer[c.layer][c.forward] += 1
            if c.backward and self.ctx.training:
                bwd[c.backward] += 1
        return {"forward": fwd, "backward": bwd, "per_layer_forward": dict(per_layer)}

    def fingerprint(self) -> str:
        """Hash of the plan's decisions; every rank must compute the same one."""
        return hashlib.sha256(self.fingerprint_text().encode()).hexdigest()[:16]

    def fingerprint_text(self) -> str:
        """What ``fingerprint`` hashes: placements, then every node's op, shape and placement."""
        text = f"world={self.world}\n"
        text += "\n".join(f"{k}={fmt(v)}" for k, v in sorted(self.placements.items()))
        for n in self.gm.graph.nodes:
            v = val(n)
            shape = tuple(v.shape) if isinstance(v, torch.Tensor) else None
            dtype = v.dtype if isinstance(v, torch.Tensor) else None
            text += f"\n{n.name}:{_target_name(n.target)}:{shape}:{dtype}:{fmt(n.meta.get('autotp', {}).get('placement'))}"
        return text

    # ---- text ----
    def graph_text(self, rank: int = 0) -> str:
        """The rewritten graph, one op per line: name, op, placement, local shape, collective."""
        gm = self.rewritten() if rank == 0 else self.rewritten(rank)
        lines = [f"# world={self.world} rank={rank}"]
        for node in gm.graph.nodes:
            info = node.meta.get("autotp", {})
            v = val(node)
            if node.op == "output":
                lines.append(f"output {[a.name if isinstance(a, fx.Node) else a for a in tensor_inputs(node)]}")
                continue
            if not isinstance(v, (torch.Tensor, tuple, list)):
                continue
            p = info.get("placement")
            if node.op == "placeholder":
                name = self.ctx.params.get(node.name) or self.ctx.buffers.get(node.name) or node.name
                op = "param " + name if node.name in self.ctx.params else "input " + name
            else:
                target = node.target
                op = (target.__name__ if callable(target) and not hasattr(target, "_schema")
                      else str(target).replace("aten.", "").replace(".default", ""))
                op = f"{op}({_args_text(node)})"
            shape = _shape_text(v, p, self.world)
            extra = ""
            if "collective" in info:
                extra = f"  <- {info['reason']}"
            lines.append(f"{node.name} = {op}  {fmt(p)} {shape}{extra}")
        return "\n".join(lines) + "\n"

    def summary(self) -> str:
        """Per-weight placements and roles, collectives per layer, notes."""
        lines = [f"autotp plan: world size {self.world}, {len(self.placements)} parameters"]
        roles = self.roles()
        width = max((len(n) for n in roles), default=10)
        for name, p in self.placements.items():
            lines.append(f"  {name:<{width}}  {fmt(p):<7} {roles[name]}")
        c = self.counts()
        lines.append("collectives per forward: " + _counter_text(c["forward"]))
        if self.ctx.training:
            lines.append("collectives per backward: " + _counter_text(c["backward"]))
        for layer, cnt in sorted(((k, v) for k, v in c["per_layer_forward"].items() if k is not None)):
            lines.append(f"  layer {layer}: forward {_counter_text(cnt)}")
        for n in self.notes:
            lines.append("note: " + n)
        return "\n".join(lines)

    def __str__(self):
        return self.summary()

    # ---- the plan as data ----
    def to_dict(self) -> dict:
        """Per parameter: placement and role, and why (the collectives next to it); per collective:
        where it sits and why.  JSON-serialisable; ``save`` writes it."""
        by_module: dict[str, list[str]] = collections.defaultdict(list)
        colls = self.collectives()
        for c in colls:
            by_module[c.module].append(f"{c.kind} ({c.forward or '-'} fwd / {c.backward or '-'} bwd)")
        roles = self.roles()
        params = {}
        for name, p in self.placements.items():
            module = name.rpartition(".")[0]
            params[name] = {"placement": fmt(p), "role": roles.get(name, ""),
                            "collectives_here": by_module.get(module, [])}
        return {"world_size": self.world, "fingerprint": self.fingerprint(), "parameters": params,
                "collectives": [{"node": c.node, "kind": c.kind, "forward": c.forward, "backward": c.backward,
                                 "shape": [str(x) for x in c.sym_shape], "bytes": str(c.sym_bytes),
                                 "module": c.module, "source": c.source, "reason": c.reason} for c in colls],
                "notes": self.notes}

    def save(self, path) -> None:
        import json
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=2)

    def to_tp_plan(self, style: str = "hf") -> tuple[dict, list[str]]:
        """The plan in the hand-written form, where it fits: ``style="hf"`` gives a Hugging Face
        ``tp_plan`` ({module: "colwise" | "rowwise"}), ``style="dtensor"`` a dict for
        ``torch.distributed.tensor.parallel.parallelize_module`` (ColwiseParallel/RowwiseParallel).
        Returns (plan, what it cannot express) — strided (fused) shards, hidden-split embeddings
        and non-module weights are listed rather than guessed."""
        from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel
        out, missing = {}, []
        roles = self.roles()
        for name, p in self.placements.items():
            module, _, attr = name.rpartition(".")
            role = roles.get(name, "")
            if attr != "weight" or role == "replicated" or role.startswith("sharded"):
                if role != "replicated" and attr == "weight":
                    missing.append(f"{name}: {fmt(p)} ({role})")
                continue
            if is_strided(p):
                missing.append(f"{name}: {fmt(p)} is a per-block (fused) split; tp_plan styles cannot say it")
                continue
            kind = {"column-parallel": "colwise", "row-parallel": "rowwise", "vocab-parallel": "rowwise"}.get(role)
            if kind is None:
                missing.append(f"{name}: {fmt(p)} ({role})")
                continue
            if role == "column-parallel" and p.dim != 0:
                missing.append(f"{name}: {fmt(p)} column split of a non-(out, in) weight (e.g. Conv1D)")
                continue
            out[module] = kind if style == "hf" else (ColwiseParallel() if kind == "colwise" else RowwiseParallel())
        return out, missing

    # ---- seeing the plan (autotp.report, autotp.viz) ----
    def report(self, **kwargs) -> str:
        """The cost report: every collective's bytes (symbolic in batch and seq) and time at a
        link, totals, per-rank memory; ``fmt="text" | "markdown" | "json"``.  See autotp.report."""
        from autotp.report_text import report
        return report(self, **kwargs)

    def report_data(self, **kwargs) -> dict:
        from autotp.report import report_data
        return report_data(self, **kwargs)

    def dump(self, out_dir, **kwargs):
        """Every pass's graph as text and graphviz SVG, in pipeline order.  See autotp.viz."""
        from autotp.viz import dump
        return dump(self, out_dir, **kwargs)


def _target_name(target) -> str:
    """A node's target as the same text in every process (a Python function's repr has its
    address: ``<function sym_float at 0x7f...>``)."""
    if callable(target) and not isinstance(target, torch._ops.OpOverload) and hasattr(target, "__qualname__"):
        return f"{getattr(target, '__module__', '')}.{target.__qualname__}"
    return str(target)


def _compute_user(node: fx.Node) -> fx.Node | None:
    """The first op that computes with a weight, looking through views of it (a transposed
    expert weight is still the weight)."""
    seen = 0
    while node.users and seen < 8:
        user = next(iter(node.users))
        if str(user.target) not in WEIGHT_VIEWS:
            return user
        node, seen = user, seen + 1
    return None


def _args_text(node: fx.Node) -> str:
    def show(a):
        if isinstance(a, fx.Node):
            return a.name
        if isinstance(a, (list, tuple)):
            return "[" + ", ".join(show(x) for x in a) + "]"
        if isinstance(a, torch.dtype):
            return str(a).replace("torch.", "")
        if isinstance(a, float):
            return f"{a:g}"
        return str(a)
    parts = [show(a) for a in node.args] + [f"{k}={show(v)}" for k, v in node.kwargs.items()
                                            if k not in ("device", "pin_memory", "layout")]
    return ", ".join(parts)


def _counter_text(c) -> str:
    return ", ".join(f"{v} {k}" for k, v in sorted(c.items())) or "none"


def _shape_text(v, p, world) -> str:
    if isinstance(v, torch.Tensor):
        return str(local_shape(v.shape, p if not isinstance(p, tuple) else R, world))
    if isinstance(v, (tuple, list)) and isinstance(p, tuple):
        return "(" + ", ".join(str(local_shape(x.shape, q, world)) if isinstance(x, torch.Tensor) and q else "-"
                               for x, q in zip(v, p)) + ")"
    return ""


def _size_name(captured: Captured, sym) -> str:
    """A size symbol as a note names it: `batch` (dim 0) or `seq` (dim 1) only where the symbol
    is that dim of token ids (an integer input), else neutrally as the first input dim it is
    ("dim 1 of `pixel_values`": an image's dim 1 is its channels, a hidden state's may be
    anything)."""
    role = str(captured.symbols.get(sym, ""))
    for node in captured.gm.graph.nodes:
        v = node.meta.get("val")
        if node.op != "placeholder" or node.name not in captured.user_inputs or not isinstance(v, torch.Tensor):
            continue
        for d, size in enumerate(v.shape):
            if isinstance(size, torch.SymInt) and size.node.expr == sym:
                tokens = not v.dtype.is_floating_point and not v.dtype.is_complex
                return f"`{role}`" if tokens and (role, d) in (("batch", 0), ("seq", 1)) \
                    else f"dim {d} of `{node.name}`"
    return f"`{role or sym}`"


def _expand_overrides(overrides: dict | None, names: list[str]) -> dict[str, Placement]:
    pins = {}
    for pattern, placement in (overrides or {}).items():
        hits = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
        if not hits:
            raise AutoTPError(f"override {pattern!r} matches no parameter; parameters look like {names[:3]}")
        for n in hits:
            pins[n] = placement
    return pins


_UNITS = {"": 1, "b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12, "kib": 2**10, "mib": 2**20, "gib": 2**30,
          "tib": 2**40}


def parse_bytes(value, name: str) -> float | None:
    """A byte count: a number, or a string such as "40GiB", "12 GB", "512MiB"."""
    if value is None or isinstance(value, (int, float)) and not isinstance(value, bool):
        return None if value is None else float(value)
    import re
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(value))
    if not m or m.group(2).lower() not in _UNITS:
        raise AutoTPError(f"{name}={value!r}: give bytes as a number or a string such as '40GiB', '12 GB', '512MiB'")
    return float(m.group(1)) * _UNITS[m.group(2).lower()]


def make_plan(model: torch.nn.Module, example_inputs=(), example_kwargs=None, *, world_size: int,
              strict: bool = False, link="nvlink-h100", overrides=None, training: bool = True,
              sharded_outputs: bool = False, dynamic: bool = True, plan_batch: int = 4,
              plan_seq: int = 2048, sequence_parallel: bool = False, carried_state: dict | None = None,
              max_activation_bytes: float | None = None, dump=None, dp_sharded: bool = False,
              param_dtype: torch.dtype | None = None, memory_budget: float | str | None = None,
              device: str = "h100-sxm") -> Plan:
    """``param_dtype``: plan the graph the model computes with its floating-point parameters in
    that dtype (``capture.params_as``; the parameters themselves stay as they are): every tensor
    the graph derives from them, and so every activation and collective the cost model prices,
    has that dtype.

    ``dp_sharded=True``: FSDP2 will shard the parameters again over another mesh dim, so no
    placement it cannot describe (``PassContext.dp_sharded``; ``autotp.parallelize`` on the "tp"
    dim of a larger mesh).  ``carried_state``: {output index: input index} (positions among the flattened tensor outputs
    and user inputs) for outputs that are the next value of an input, e.g. a KV cache
    (``autotp.generate``): such an input may be sharded and its output keeps its placement."""
    if world_size < 1:
        raise AutoTPError(f"world_size must be >= 1, got {world_size}")
    if not isinstance(example_inputs, (tuple, list)):
        example_inputs = (example_inputs,)
    captured = capture(model, tuple(example_inputs), example_kwargs, dynamic, param_dtype=param_dtype)
    aliases: dict[str, list[str]] = collections.defaultdict(list)
    by_id = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(p), []).append(name)
    for names in by_id.values():
        for n in names:
            aliases[n] = names
    pins = _expand_overrides(overrides, [n for n, _ in model.named_parameters()])
    canonical_pins = {}
    for name, pl in pins.items():
        canonical = next((c for c in captured.params.values() if name in aliases.get(c, [c])), name)
        canonical_pins[canonical] = pl
    import sympy
    sizes = {"batch": plan_batch, "seq": plan_seq}
    plan_sizes = {sym: sympy.Integer(sizes[str(name)]) for sym, name in captured.symbols.items()}
    ctx = PassContext(world=world_size, strict=strict, link=link, training=training,
                      sharded_outputs=sharded_outputs, pins=canonical_pins, params=captured.params,
                      buffers=captured.buffers, user_inputs=captured.user_inputs, plan_sizes=plan_sizes,
                      size_names={sym: str(name) for sym, name in captured.symbols.items()},
                      sequence_parallel=sequence_parallel, dp_sharded=dp_sharded,
                      max_activation_mib=None if max_activation_bytes is None else max_activation_bytes / 2**20,
                      memory_budget=parse_bytes(memory_budget, "memory_budget"), device=device)
    ctx.state_outputs = {o: captured.user_inputs[i] for o, i in (carried_state or {}).items()}
    for node in captured.gm.graph.nodes:
        v = node.meta.get("val")
        if node.op == "placeholder" and node.name in captured.user_inputs and isinstance(v, torch.Tensor):
            for d, size in list(enumerate(v.shape))[:2]:
                if static_size(size) is not None and not isinstance(size, int):
                    ctx.note(f"torch.export fixed dim {d} of `{node.name}` (shape {list(concrete(v).shape)}) at "
                             f"{static_size(size)}: the model's code depends on it, so this plan runs only at that size")
    for sym, (example, where_node, _) in captured.pinned.items():
        ctx.note(f"the graph unrolls a Python loop over {_size_name(captured, sym)} (node `{where_node}`): this "
                 f"plan runs only when it is {example}")
    if captured.stamped:
        path, n = captured.stamped
        ctx.note(f"captured: torch.export traced layers 0, 1, 2 and {n - 1} of `{path}`; layers 3-{n - 2} are copies of "
                 f"layer 1's graph (the layers and their traces were checked identical; AUTOTP_STAMP=0 traces all)")
    gm = captured.gm
    free = copy_graph_module(gm) if canonical_pins else None
    for p in PLAN_PASSES:
        gm = p(gm, ctx)
    if free is not None:                     # what the pins cost: the same problem without them
        free_ctx = dataclasses.replace(ctx, pins={}, notes=[], solver_stats={})
        for p in PLAN_PASSES:
            free = p(free, free_ctx)
        extra_us = ctx.solver_stats["comm_time_us"] - free_ctx.solver_stats["comm_time_us"]
        extra_mem = ctx.solver_stats["weight_bytes_per_rank"] - free_ctx.solver_stats["weight_bytes_per_rank"]
        ctx.solver_stats["pin_cost"] = {"comm_time_us": extra_us, "weight_bytes_per_rank": extra_mem}
        ctx.note(f"overrides cost {extra_us:+.1f} us of communication per step (at batch {plan_batch} x seq "
                 f"{plan_seq}, link {link}) and {extra_mem / 2**20:+.2f} MiB of weights per rank vs the free plan")
    plan = Plan(captured, ctx, gm, dict(aliases))
    if dump is False:                        # another rank writes the dumps
        pass
    elif dump is not None:
        plan.dump(dump)
    else:
        from autotp.viz import dump_from_env
        dump_from_env(plan)                  # AUTOTP_DUMP=dir
    return plan
