"""The rank-local module: the rewritten graph plus this rank's shard of every parameter.

Parameters keep their original names (``model.layers.0.self_attn.q_proj.weight``) and are
``DTensor``s on the mesh with the placement the plan chose, so optimizers,
``p.grad.full_tensor()`` and ``torch.distributed.checkpoint`` work unchanged.  The graph
computes on ``p.to_local()``; autograd carries each local gradient back into the DTensor.
"""
from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist
import torch.fx as fx
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor
from torch.utils import _pytree as pytree

from autotp.base import AutoTPError, layer_index, module_path
from autotp.blocks import (checkpoint_mode, cut, model_checkpointing, rank_local_block, read_feed,
                           share_children)
from autotp.checkpoint import materialize_buffers
from autotp.placement import Grid, P, R, fmt, local_chunk
from autotp.plan import Plan
from autotp.program import adopt, check_same_inputs, mesh_device, mesh_for, retarget_meta, static_size

DEFAULT_TIMEOUT = datetime.timedelta(minutes=10)


def default_mesh(timeout: datetime.timedelta = DEFAULT_TIMEOUT, device_type: str | None = None) -> DeviceMesh:
    """All ranks on one "tp" dimension; starts the process group if torchrun has not."""
    if device_type is None:
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
    if not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
            dist.init_process_group(backend, timeout=timeout)
        else:   # one process, no launcher: a world of one
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    if device_type == "cuda":
        torch.cuda.set_device(dist.get_rank() % torch.cuda.device_count())
    return init_device_mesh(device_type, (dist.get_world_size(),), mesh_dim_names=("tp",))


def tp_mesh(mesh: DeviceMesh | None, timeout=DEFAULT_TIMEOUT) -> DeviceMesh:
    if mesh is None:
        return default_mesh(timeout)
    if not isinstance(mesh, DeviceMesh):
        raise AutoTPError(f"mesh= must be a torch.distributed.device_mesh.DeviceMesh, got {type(mesh).__name__}")
    if mesh.ndim > 1:
        names = mesh.mesh_dim_names or ()
        if "tp" not in names:
            raise AutoTPError(f"a {mesh.ndim}-D mesh needs a dimension named 'tp' for tensor parallelism; "
                              f"this one has {names}. Build it with init_device_mesh(..., mesh_dim_names=(..., 'tp'))")
        mesh = mesh["tp"]
    if mesh.get_coordinate() is None:
        raise AutoTPError(f"this rank ({dist.get_rank()}) is not in the mesh {mesh.mesh.tolist()}; every rank that "
                          f"calls parallelize must be part of the mesh it is given")
    return mesh




def clip_grad_norm_(parameters, max_norm: float, norm_type: float = 2.0, foreach: bool | None = None) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` for a parallel model whose parameters live on more than
    one mesh: experts split EP x TP are DTensors on the 2-D ``("ep", "etp")`` view, the rest on
    the 1-D mesh, and torch's version cannot stack norms from different meshes.  The norm of
    each mesh's gradients, then the norm of those norms (the same number for every p-norm and
    for inf); returns the total norm, as torch's does.  A collective: call it on every rank."""
    params = [p for p in ([parameters] if isinstance(parameters, torch.Tensor) else parameters) if p.grad is not None]
    if not params:
        return torch.tensor(0.0)
    by_mesh: dict = {}
    for p in params:
        by_mesh.setdefault(p.grad.device_mesh if isinstance(p.grad, DTensor) else None, []).append(p.grad)
    norms = []
    for grads in by_mesh.values():
        n = torch.nn.utils.get_total_norm(grads, norm_type, foreach=foreach)
        norms.append(n.full_tensor() if isinstance(n, DTensor) else n)
    total = torch.nn.utils.get_total_norm([n.reshape(1) for n in norms], norm_type)
    coef = min(1.0, max_norm / (float(total) + 1e-6))       # torch's clip coefficient
    with torch.no_grad():
        for p in params:
            p.grad.mul_(coef)
    return total


class ParallelModule(nn.Module):
    """A model parallelised by autotp.  Call it like the original model.

    The module tree is the model's: each repeated block the plan could cut (a decoder layer) is a
    rank-local module at its original path (``pmodel.model.layers[3]``) that runs that block's
    part of the rewritten graph and owns the block's DTensor parameters (``autotp.blocks``), so
    ``fully_shard``, ``checkpoint_wrapper`` and ``torch.compile`` apply per layer as on the plain
    model.  The root runs its own parts (embedding, final norm, head) and calls the blocks in order.
    """

    def __init__(self, model: nn.Module, plan: Plan, mesh: DeviceMesh, check_inputs: bool = False,
                 activation_checkpointing: str | None = None):
        super().__init__()
        self.check_inputs = check_inputs      # debug: all ranks must pass identical inputs
        self.config = getattr(model, "config", None)
        made = materialize_buffers(model, mesh_device(mesh))
        if made:
            plan.ctx.note(f"buffers on the meta device computed by the model's own init code on "
                          f"{mesh_device(mesh)}: {', '.join(made)}")
        adopt(self, model)
        rank, world = mesh.get_local_rank(), mesh.size()
        object.__setattr__(self, "plan", plan)
        object.__setattr__(self, "mesh", mesh)
        object.__setattr__(self, "source_model", model)   # its module code: generate() plans a decode step
        group = mesh.get_group().group_name
        object.__setattr__(self, "graph_module", plan.rewritten(rank, group))
        retarget_meta(self.graph_module, mesh_device(mesh))
        self._shard_parameters(model, rank, world)
        self._build_blocks()
        self._feeds = self._input_feeds()       # after the blocks: a block's own parameters live on the block
        for seg, slot in zip(self._segments, self._block_slots):
            if slot is not None:
                getattr(*slot).__dict__["_autotp_run"] = (seg, [self._feeds[name] for name in seg.owned])
        self._divisors = [(_monomial(expr), divisor, _indivisible_message(expr, divisor, node, p, plan, mesh))
                          for expr, divisor, node, p in plan.size_divisors()]
        self.activation_checkpointing = model_checkpointing(activation_checkpointing, model, self._block_slots, plan)

    @property
    def activation_checkpointing(self) -> str | None:
        """None, "full" or "selective": what each block does in a training forward (settable)."""
        return self.__dict__.get("_activation_checkpointing")

    @activation_checkpointing.setter
    def activation_checkpointing(self, mode: str | None) -> None:
        mode = checkpoint_mode(mode)
        self.__dict__["_activation_checkpointing"] = mode
        for block in self.blocks():
            block.__dict__["_autotp_checkpoint"] = mode

    def _shard_parameters(self, model: nn.Module, rank: int, world: int) -> None:
        placements = self.plan.placements
        done: dict[int, nn.Parameter] = {}
        for name, full in model.named_parameters(remove_duplicate=False):
            if id(full) not in done:
                p = placements.get(name, R)
                local = local_chunk(full.detach(), p, rank, world).contiguous()
                dt = DTensor.from_local(local, *mesh_for(self.mesh, p), run_check=False, shape=full.shape,
                                        stride=full.stride())
                done[id(full)] = nn.Parameter(dt, requires_grad=full.requires_grad)
            module_name, _, attr = name.rpartition(".")
            owner = self.get_submodule(module_name) if module_name else self
            setattr(owner, attr, done[id(full)])

    def _input_feeds(self) -> dict:
        """What feeds each placeholder, by name.  Parameters and buffers are resolved to (owning
        module, attribute) once, so a step does no dotted-name lookups, and ``load_checkpoint``'s
        replacement of a parameter on its module (or FSDP2's, of a sharded one by its unsharded
        one) is what the next step reads."""
        plan = self.plan
        feeds = {}

        def owner(name: str):
            module_name, _, attr = name.rpartition(".")
            return (self.get_submodule(module_name) if module_name else self), attr

        for node in self.graph_module.graph.nodes:
            if node.op != "placeholder":
                continue
            if node.name in plan.captured.params:
                name = plan.captured.params[node.name]
                grid = isinstance(node.meta.get("autotp", {}).get("placement"), Grid)
                feeds[node.name] = ("param", *owner(name), 2 if grid else 1, name, node.meta["val"].dtype)
            elif node.name in plan.captured.buffers:
                feeds[node.name] = ("buffer", *owner(plan.captured.buffers[node.name]))
            elif node.name in plan.captured.constants:
                feeds[node.name] = ("const", plan.captured.constants[node.name])
            else:
                feeds[node.name] = ("user", plan.captured.user_inputs.index(node.name), node)
        return feeds

    def _build_blocks(self) -> None:
        """Cut the rewritten graph at the model's blocks and put a rank-local module at each block's
        path.  The containers on the way (``model``, ``model.layers``) are shallow copies, so the
        source model keeps its own layers (``generate`` traces their code)."""
        owner_of = {**self.plan.captured.params, **self.plan.captured.buffers}
        segments, uncut = cut(self.graph_module, owner_of)
        if uncut:
            self.plan.ctx.note(f"not cut into blocks (their nodes are not contiguous in the graph, so they run in the "
                               f"root's part): {', '.join(uncut)}")
        self._segments = segments
        self._owned = {n for seg in segments for n in seg.owned}     # fed by their blocks, not the root
        self._block_slots: list = []              # per segment: (parent module, child name) or None
        copied: set[int] = set()
        for seg in segments:
            if seg.path is None:
                self._block_slots.append(None)
                continue
            parent = self
            *ancestors, leaf = seg.path.split(".")
            for name in ancestors:                # copy each container once, then descend into the copy
                child = parent._modules[name]
                if id(child) not in copied:
                    child = share_children(child)
                    parent._modules[name] = child
                    copied.add(id(child))
                parent = child
            block = rank_local_block(parent._modules[leaf])
            parent._modules[leaf] = block
            self._block_slots.append((parent, leaf))
        # each segment's values that no later segment reads are dropped from the step's environment
        last: dict[str, int] = {}
        for i, seg in enumerate(segments):
            for name in seg.inputs:
                last[name] = i
        kept = {a.name for a in next(n for n in self.graph_module.graph.nodes if n.op == "output").all_input_nodes}
        self._frees = [[n for n in seg.inputs if last[n] == i and n not in kept] for i, seg in enumerate(segments)]

    def blocks(self) -> list[nn.Module]:
        """The rank-local block modules, in the order they run (the decoder layers): the units for
        ``fully_shard`` and activation checkpointing."""
        return [getattr(parent, leaf) for parent, leaf in filter(None, self._block_slots)]

    def _flat_user_inputs(self, args, kwargs) -> list:
        cap = self.plan.captured
        # only plain values given at capture (use_cache=False) act as defaults; a tensor keyword
        # of the example (a mask) must be passed again, never silently reused
        defaults = {k: v for k, v in cap.example_kwargs.items() if not isinstance(v, torch.Tensor)}
        missing = [k for k, v in cap.example_kwargs.items() if isinstance(v, torch.Tensor) and k not in kwargs]
        if missing:
            raise AutoTPError(f"keyword argument(s) {missing} were in the example the plan was made from but are "
                              f"missing; pass them (e.g. attention_mask=torch.ones_like(input_ids) for no padding) "
                              f"or plan without them")
        merged = {**defaults, **kwargs}
        kw_spec = cap.in_spec.child(1)
        keys = list(kw_spec.context) if kw_spec.context else []
        extra = set(merged) - set(keys)
        if extra:
            raise AutoTPError(f"keyword argument(s) {sorted(extra)} were not in the example the plan was made from "
                              f"(it had {keys}); call autotp.parallelize again with them in example_kwargs")
        flat, spec = pytree.tree_flatten((tuple(args), {k: merged[k] for k in keys if k in merged}))
        if spec != cap.in_spec:
            raise AutoTPError(f"the inputs do not have the structure of the example the plan was made from.\n"
                              f"  expected: {cap.in_spec}\n  got: {spec}")
        return flat

    def forward(self, *args, **kwargs):
        env = self._root_values(args, kwargs)
        for seg, slot, frees in zip(self._segments, self._block_slots, self._frees):
            values = [env[n] for n in seg.inputs]
            for n in frees:
                del env[n]
            if slot is None:            # the graph's own forward: no module hooks on autotp's internal graphs
                outs = seg.gm.forward(*values)
            else:                       # the module now at the block's path (maybe the user's wrapper)
                outs = getattr(*slot)(*values)
            env.update(zip(seg.outputs, outs))
        out = next(n for n in self.graph_module.graph.nodes if n.op == "output")
        outs = pytree.tree_leaves(pytree.tree_map(lambda a: env[a.name] if isinstance(a, fx.Node) else a,
                                                  out.args[0]))
        if self.plan.ctx.sharded_outputs:
            outs = [self._as_dtensor(o, n) for o, n in zip(outs, self._output_nodes())]
        return pytree.tree_unflatten(list(outs), self.plan.captured.out_spec)

    def generate(self, input_ids: torch.Tensor, *args, **kwargs):
        """Hugging Face's ``generate`` (``input_ids, attention_mask=None, generation_config=None,
        **kwargs``) with a KV cache split by heads like k and v (``autotp.generation``); a
        positional int after the ids is ``max_new_tokens``."""
        from autotp.generation import generate
        return generate(self, input_ids, *args, **kwargs)

    def expert_load(self, *args, **kwargs) -> list[dict]:
        """Load balance of one batch: for every MoE layer, tokens routed to each expert and to
        each rank — the rows of the experts its group owns (``expert_groups``: N under expert
        parallelism, ``a`` on an EP x TP grid, 1 when every rank runs every expert).  Runs one
        forward without gradients; a collective like the forward, so call it on every rank."""
        inputs = self._graph_inputs(args, kwargs)
        found: list[tuple[fx.Node, torch.Tensor]] = []

        class _Record(fx.Interpreter):
            def run_node(self, node):
                out = super().run_node(node)
                if node.op == "call_function" and node.target == torch.ops.aten.histc.default \
                        and layer_index(module_path(node)) is not None:     # not an aux loss's histogram
                    found.append((node, out.detach()))
                return out

        with torch.no_grad():
            _Record(self.graph_module).run(*inputs)
        world, layers = self.mesh.size(), []
        for node, counts in found:
            if node.meta.get("autotp", {}).get("placement") == P:    # routed on each rank's own tokens
                counts = counts.clone()
                dist.all_reduce(counts, group=self.mesh.get_group())
            counts = counts.round().long()
            groups = self._expert_groups(node)
            per_group = counts.view(groups, -1).sum(1).tolist() if counts.numel() % groups == 0 else None
            # every rank of a group runs the group's rows (1/(N/groups) of their width each)
            per_rank = [per_group[r * groups // world] for r in range(world)] if per_group else None
            layers.append({"module": module_path(node), "tokens_per_expert": counts.tolist(),
                           "expert_groups": groups, "tokens_per_rank": per_rank,
                           "imbalance": (max(per_group) / max(1e-9, sum(per_group) / groups)) if per_group else None})
        return layers

    def _expert_groups(self, histc: fx.Node) -> int:
        """Into how many owner groups the experts of ``histc``'s MoE layer are split: N under
        expert parallelism, ``a`` on an EP x TP grid, 1 when every rank runs every expert (TP
        inside the experts, or replicated)."""
        from autotp.passes.rules.moe import _is_grouped_mm
        layer = layer_index(module_path(histc))
        for n in self.plan.gm.graph.nodes:
            if n.op == "call_function" and _is_grouped_mm(n.target) and layer_index(module_path(n)) == layer:
                w = n.meta["autotp"]["strategy"].inputs[1]
                if isinstance(w, Grid):
                    return w.groups
                return self.mesh.size() if getattr(w, "dim", None) == 0 else 1
        return 1

    def _graph_inputs(self, args, kwargs) -> list:
        """Every placeholder's value, in order: the flat graph's inputs (``expert_load``)."""
        env = self._root_values(args, kwargs, everything=True)
        return [env[node.name] for node in self.graph_module.graph.nodes if node.op == "placeholder"]

    def _root_values(self, args, kwargs, everything: bool = False) -> dict:
        """The values the root feeds: user inputs, and every parameter, buffer and constant that is
        not read inside the block that owns it (``everything``: those too)."""
        flat = self._flat_user_inputs(args, kwargs)
        if self.check_inputs:
            self._check_same_inputs(flat)
        sizes: dict = {}                      # size symbol -> the value this call binds it to
        owned = set() if everything else self._owned
        env = {}
        for name, feed in self._feeds.items():
            if name in owned:
                continue
            if feed[0] == "user":
                env[name] = _check_input(flat[feed[1]], feed[2], sizes, self.plan.captured.pinned)
            else:
                env[name] = read_feed(feed)
        if self._divisors:
            self._check_divisible(sizes)
        return env

    def _check_divisible(self, sizes: dict) -> None:
        """Sizes the plan splits (the sequence, under sequence parallelism) must divide evenly.
        Plain integer arithmetic on the bound sizes (precomputed monomials), so torch.compile
        traces it as a guard instead of breaking the graph."""
        for mono, divisor, message in self._divisors:
            if mono is None:
                continue
            coeff, factors = mono
            n = coeff
            for sym, power in factors:
                if sym not in sizes:
                    break
                n *= sizes[sym][0] ** power
            else:
                if n % divisor:
                    raise AutoTPError(message.format(n=n))

    def _check_same_inputs(self, flat: list) -> None:
        """Debug mode: every rank must pass the same inputs (one small all-gather per call)."""
        check_same_inputs(list(zip(self.plan.captured.user_inputs, flat)), self.mesh,
                          "every rank of the tensor-parallel group must pass the same inputs (split the batch "
                          "over a data-parallel mesh dim, not 'tp')")

    def _output_nodes(self):
        out = next(n for n in self.graph_module.graph.nodes if n.op == "output")
        return list(pytree.tree_leaves(out.args[0]))

    def _as_dtensor(self, t, node):
        p = node.meta.get("autotp", {}).get("placement") if isinstance(node, fx.Node) else None
        if not isinstance(t, torch.Tensor) or p is None:
            return t
        return DTensor.from_local(t, *mesh_for(self.mesh, p), run_check=False)   # even shards: shape inferred


def _monomial(expr) -> tuple | None:
    """``c * s0**a * s1**b`` as ``(c, (("s0", a), ("s1", b)))`` over export's size symbols; None
    for anything else (a sum: not checked)."""
    coeff, rest = expr.as_coeff_Mul()
    factors = []
    for base, power in rest.as_powers_dict().items():
        if not (base.is_Symbol and power.is_Integer and power > 0):
            return None
        factors.append((str(base), int(power)))
    return (int(coeff), tuple(sorted(factors))) if coeff.is_Integer else None


def _indivisible_message(expr, divisor: int, node: fx.Node, p, plan, mesh) -> str:
    name = str(expr.xreplace(plan.captured.symbols))
    return (f"{name} = {{n}} does not divide by {divisor}: the plan splits it {fmt(p)} over {mesh.size()} "
            f"ranks (node `{node.name}`{_where(node)}); pad the input to a multiple of {divisor}, or plan "
            f"without sequence_parallel")


def _where(node: fx.Node) -> str:
    path = module_path(node)
    return f" in `{path}`" if path else ""


def _check_input(x, node: fx.Node, sizes: dict, pinned: dict | None = None):
    pinned = pinned or {}
    want = node.meta.get("val")
    if isinstance(want, torch.Tensor):
        if not isinstance(x, torch.Tensor):
            raise AutoTPError(f"input `{node.name}` must be a tensor like the example, got {type(x).__name__}")
        if x.dtype != want.dtype:
            raise AutoTPError(f"input `{node.name}` has dtype {x.dtype}, but the plan was made for {want.dtype}; "
                              f"pass {want.dtype} or call autotp.parallelize again with an example of this dtype")
        if x.device.type != want.device.type and want.device.type != "meta":
            raise AutoTPError(f"input `{node.name}` is on {x.device}, but the model runs on {want.device}; "
                              f"move it with .to({str(want.device)!r})")
        if not _shape_matches(x.shape, want.shape):
            raise AutoTPError(f"input `{node.name}` has shape {list(x.shape)}, but the plan was made for "
                              f"{_shape_names(want.shape)}; pass inputs of that shape, or call autotp.parallelize "
                              f"again with an example of this shape")
        for got, size in zip(x.shape, want.shape):
            if isinstance(size, torch.SymInt) and static_size(size) is None:
                expr = size.node.expr
                if expr in pinned and got != pinned[expr][0]:
                    example, where, line = pinned[expr]
                    raise AutoTPError(f"input `{node.name}` has {got} where the plan was made for {example}: the "
                                      f"model loops over this dim in Python, so the captured graph is unrolled for "
                                      f"{example} (node `{where}`: {line[0].strip() if line else ''}); call "
                                      f"autotp.parallelize again with an example of this size")
                key = str(size.node.expr)
                first = sizes.setdefault(key, (got, node.name))
                if first[0] != got:
                    raise AutoTPError(f"input `{node.name}` has {got} where input `{first[1]}` has {first[0]}: "
                                      f"the model needs them equal (the same batch or sequence dim)")
        return x
    if x != want:
        raise AutoTPError(f"input `{node.name}` is {x!r}, but the plan was made with {want!r}; it is baked into "
                          f"the captured graph — call autotp.parallelize again with this value")
    return x


def _shape_names(shape) -> list:
    """Fixed sizes as numbers, the others as export's size expression (``s0``, ``2*s1``): which
    dims vary, without guessing what they mean (dim 1 of an image is its channels)."""
    return [static_size(s) if static_size(s) is not None else str(s.node.expr) for s in shape]


def _shape_matches(got, want) -> bool:
    if len(got) != len(want):
        return False
    for g, w in zip(got, want):
        fixed = static_size(w)
        if fixed is not None and g != fixed:
            return False
    return True
