"""The rank-local program: what ``ParallelModule`` and generation both do with a rewritten graph —
copy it, move the ops a meta-device model baked ``device=meta`` into onto the run device, adopt
the model's parameters under their own names, and read the fixed sizes export kept."""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.fx as fx
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh
from torch.utils import _pytree as pytree

from autotp import comm
from autotp.base import AutoTPError
from autotp.placement import Blocks, Grid, groups_of

try:                                    # torch's GraphModule that defers code generation to first use
    from torch.fx._lazy_graph_module import _LazyGraphModule
except ImportError:                     # pragma: no cover — older/newer torch: eager, still correct
    _LazyGraphModule = fx.GraphModule


def adopt(module: nn.Module, model: nn.Module) -> None:
    """Make ``model``'s children, own parameters and buffers ``module``'s, under the same names,
    so ``module.named_parameters()`` reads exactly like ``model``'s."""
    for name, child in model.named_children():
        module.add_module(name, child)
    for name, p in model.named_parameters(recurse=False):
        module.register_parameter(name, p)
    for name, b in model.named_buffers(recurse=False):
        module.register_buffer(name, b)


def mesh_device(mesh: DeviceMesh) -> torch.device:
    if mesh.device_type == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(mesh.device_type)


def retarget_meta(gm: fx.GraphModule, device: torch.device) -> None:
    """A model built on the meta device bakes ``device=meta`` into the ops that create tensors
    (``arange``, ``.to(x.device)``); the weights arrive later on ``device``, so do those ops."""
    meta = torch.device("meta")

    def fix(a):
        return device if isinstance(a, torch.device) and a == meta else a

    changed = False
    for node in gm.graph.nodes:
        args, kwargs = pytree.tree_map(fix, (node.args, node.kwargs))
        if args != node.args or kwargs != node.kwargs:
            node.args, node.kwargs = tuple(args), kwargs
            changed = True
        changed |= _histc_for(node, device)
    if changed:
        gm.recompile()


def static_size(size) -> int | None:
    """The size when it is fixed (an int, or a SymInt export specialised to a number)."""
    if isinstance(size, int):
        return size
    expr = size.node.expr
    return int(expr) if expr.is_number else None


def copy_graph_module(gm: fx.GraphModule, lazy: bool = False) -> fx.GraphModule:
    """A copy whose nodes own their meta.  ``lazy``: a module that generates its Python code
    on first use, not on every ``recompile()`` (a pass pipeline recompiles after each pass;
    the code of an 80-layer graph takes ~0.15 s each time)."""
    graph = fx.Graph()
    val_map: dict = {}
    out = graph.graph_copy(gm.graph, val_map)
    output = graph.output(out)
    old_output = next(n for n in gm.graph.nodes if n.op == "output")
    val_map[old_output] = output          # its meta too: the outputs the plan settled (sharded_outputs)
    for old, new in val_map.items():
        new.meta = dict(old.meta)
        if "autotp" in old.meta:
            new.meta["autotp"] = dict(old.meta["autotp"])
    return (_LazyGraphModule if lazy else fx.GraphModule)(gm, graph)


def _histc_for(node: fx.Node, device: torch.device) -> bool:
    """transformers picks ``histc``'s input dtype by device (CPU: float only; CUDA: int, for
    deterministic mode), so a trace on the meta device took the non-CPU branch: cast an integer
    input to float where the graph runs on CPU (the counts are the same)."""
    if node.op != "call_function" or node.target != torch.ops.aten.histc.default or device.type not in ("cpu", "mps"):
        return False
    x = node.args[0]
    v = x.meta.get("val") if isinstance(x, fx.Node) else None
    if not isinstance(v, torch.Tensor) or v.is_floating_point():
        return False
    with node.graph.inserting_before(node):
        cast = node.graph.call_function(torch.ops.aten._to_copy.default, (x,), {"dtype": torch.float32})
    cast.meta.update(x.meta)
    cast.meta["val"] = v.to(torch.float32) if v.device.type == "meta" else v.float()
    node.args = (cast, *node.args[1:])
    return True


_GRID_MESHES: dict = {}


def mesh_for(mesh: DeviceMesh, p) -> tuple[DeviceMesh, list]:
    """The mesh and placement list of a DTensor placed ``p`` on the tensor-parallel ``mesh``: the
    mesh itself for a 1-D placement; for a ``Grid`` (experts split over groups x tensor-parallel
    inside each group) its 2-D view ``("ep", "etp")``, made once per mesh and group count.  A fused
    ``Blocks`` with blocks whole on groups of ranks (kv heads) is a 1-D placement, whose gradient
    rows are summed inside those groups: their views are made too."""
    if isinstance(p, Blocks) and p.grouped:
        for g in {g for g in groups_of(p.sizes) if g and g > 1}:
            _grid_mesh(mesh, g)
    if not isinstance(p, Grid):
        return mesh, [p]
    return _grid_mesh(mesh, p.groups), [p.outer, p.inner]


def _grid_mesh(mesh: DeviceMesh, groups: int) -> DeviceMesh:
    key = (mesh, groups)
    if key not in _GRID_MESHES:
        shape = (groups, mesh.size() // groups)
        try:
            _GRID_MESHES[key] = mesh._unflatten(0, shape, ("ep", "etp"))
        except (AttributeError, TypeError, ValueError, RuntimeError):    # a torch without _unflatten
            _GRID_MESHES[key] = DeviceMesh(mesh.device_type, mesh.mesh.reshape(shape), mesh_dim_names=("ep", "etp"))
        # the group of this rank's (kv) group, for the gradients summed inside it (comm.reduce_grad_in_group)
        comm.GROUPS_OF[(mesh.get_group().group_name, groups)] = _GRID_MESHES[key].get_group("etp").group_name
    return _GRID_MESHES[key]


def check_same_inputs(named: list[tuple[str, object]], mesh, advice: str) -> None:
    """Every rank of ``mesh``'s group passed the same values (tensors by shape, dtype and a hash
    of their bytes; anything else by ``repr``), or an ``AutoTPError`` naming the first one that
    differs, what each rank passed, and ``advice``.  One small all-gather."""
    import hashlib
    mine = []
    for _, x in named:
        if isinstance(x, torch.Tensor):
            digest = hashlib.sha1(x.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()
            mine.append((tuple(x.shape), str(x.dtype), digest[:12]))
        else:
            mine.append(repr(x))
    seen = [None] * mesh.size()
    dist.all_gather_object(seen, mine, group=mesh.get_group())
    if all(s == seen[0] for s in seen):
        return
    for i, (name, _) in enumerate(named):
        values = [s[i] if i < len(s) else None for s in seen]
        if any(v != values[0] for v in values):
            by_rank = ", ".join(f"rank {r}: {v}" for r, v in enumerate(values))
            raise AutoTPError(f"ranks passed different inputs: `{name}` differs ({by_rank}); {advice}")
    raise AutoTPError(f"ranks passed different inputs; {advice}")


def check_same_plan(p, mesh) -> None:
    """Every rank planned the same (their plans' fingerprints agree), or a clear error."""
    group = mesh.get_group()
    mine = p.fingerprint()
    prints = [None] * mesh.size()
    dist.all_gather_object(prints, mine, group=group)
    if len(set(prints)) != 1:
        raise AutoTPError(f"ranks made different plans (fingerprints {prints}); every rank must call "
                          f"parallelize with the same model config, example input shapes and options")
