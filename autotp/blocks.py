"""The rank-local program cut back at the model's repeated blocks.

Planning works on one flat graph; running it as one graph would lose the structure every
memory technique relies on (per-layer FSDP2, activation checkpointing, regional compile).  So
the rewritten graph is cut into segments, in graph order:

    root part (embedding, rotary tables, masks) -> block 0 -> block 1 -> ... -> root part (norm, head)

A block is the set of nodes whose module stack puts them in one element of a module list
(``passes.context.block_path``: ``model.layers.3``).  Its segment becomes the ``forward`` of a
rank-local module registered at the block's path (``autotp.runtime``), which reads the block's
own parameters itself, so ``fully_shard(layer)`` and ``checkpoint_wrapper(layer)`` wrap exactly
what they wrap on the plain model.  Everything else (the root's parameters, buffers, inputs and
the activations of earlier segments) is passed in as arguments.

The cut never changes what is computed: each segment is a copy of its nodes, in order, and
the values that cross a boundary are the values the flat graph passed.  A block whose nodes
are not contiguous in the flat graph (only root nodes with no module path may sit between
them) is not cut: its nodes stay in the root's part, and the plan notes it.

Blocks whose segments are the same program (the same ops on the same arguments, up to node
names: layers 1 .. L-1 of a transformer) share one ``GraphModule``, so ``torch.compile`` of
each layer compiles one graph and reuses it for the identical layers.
"""
from __future__ import annotations

import dataclasses
import functools

import torch
import torch.fx as fx
import torch.nn as nn
from torch.utils import _pytree as pytree
from torch.utils.checkpoint import (CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts,
                                    noop_context_fn)

from autotp.base import AutoTPError, block_path


@dataclasses.dataclass
class Segment:
    """A contiguous run of the flat graph.  ``path``: the block's module path, None for the root's part.
    ``inputs``: flat-graph names the caller passes (placeholder order); ``owned``: placeholders (the
    block's own parameters and buffers) the block's module feeds itself, after ``inputs``;
    ``outputs``: flat-graph names it returns, in order."""
    path: str | None
    gm: fx.GraphModule
    inputs: list[str]
    owned: list[str]
    outputs: list[str]


def cut(gm: fx.GraphModule, owner_of: dict[str, str]) -> tuple[list[Segment], list[str]]:
    """Cut ``gm`` into segments.  ``owner_of``: placeholder name -> the parameter or buffer name
    it feeds (a placeholder a block owns is one whose name lies under the block's path).
    Returns the segments and the paths of blocks left uncut (their nodes are not contiguous)."""
    body = [n for n in gm.graph.nodes if n.op not in ("placeholder", "output")]
    keys = _keys(body)
    split = _not_contiguous(keys)
    keys = [None if k in split else k for k in keys]
    runs: list[tuple[str | None, list[fx.Node]]] = []
    for node, key in zip(body, keys):
        if runs and runs[-1][0] == key:
            runs[-1][1].append(node)
        else:
            runs.append((key, [node]))
    output = next(n for n in gm.graph.nodes if n.op == "output")
    later_uses: dict[fx.Node, int] = {}          # node -> index of the last run that reads it
    for i, (_, nodes) in enumerate(runs):
        for node in nodes:
            for a in node.all_input_nodes:
                later_uses[a] = i
    for a in output.all_input_nodes:
        later_uses[a] = len(runs)
    shared: dict[tuple, fx.GraphModule] = {}
    segments = []
    for i, (key, nodes) in enumerate(runs):
        inside = set(nodes)
        external = list(dict.fromkeys(a for n in nodes for a in n.all_input_nodes if a not in inside))
        # a block feeds itself its own parameters and buffers, unless some other part reads them too
        # (DiT reads block 0's timestep embedder again after the last block): those the root passes
        owned = [a for a in external if key is not None and a.op == "placeholder"
                 and owner_of.get(a.name, "").startswith(key + ".") and all(u in inside for u in a.users)]
        passed = [a for a in external if a not in owned]
        outputs = [n for n in nodes if later_uses.get(n, -1) > i]
        seg_gm, signature = _segment_module(gm, passed + owned, nodes, outputs)
        if key is not None:                   # the same program as an earlier block: share its module
            seg_gm = shared.setdefault(signature, seg_gm)
        segments.append(Segment(key, seg_gm, [a.name for a in passed], [a.name for a in owned],
                                [n.name for n in outputs]))
    return segments, sorted(split)


def _keys(body: list[fx.Node]) -> list[str | None]:
    """Each node's block path; a node with no module path (a size, an inserted helper) between two
    nodes of the same block belongs to that block."""
    keys = [block_path(n) for n in body]
    stacked = [bool(n.meta.get("nn_module_stack")) and not _empty_stack(n) for n in body]
    prev: str | None = None
    prev_seen = [None] * len(body)
    for i, k in enumerate(keys):
        prev_seen[i] = prev
        if stacked[i]:
            prev = k
    nxt: str | None = None
    for i in range(len(body) - 1, -1, -1):
        if stacked[i]:
            nxt = keys[i]
        elif nxt is not None and prev_seen[i] == nxt:
            keys[i] = nxt
    return keys


def _empty_stack(node: fx.Node) -> bool:
    return all(str(path).startswith("_empty_nn_module_stack") for path, _ in node.meta["nn_module_stack"].values())


def _not_contiguous(keys: list[str | None]) -> set[str]:
    """Blocks whose nodes form more than one run."""
    done, bad, prev = set(), set(), None
    for k in keys:
        if k != prev:
            done.add(prev)
            if k is not None and k in done:
                bad.add(k)
            prev = k
    return bad


def _segment_module(gm: fx.GraphModule, inputs: list[fx.Node], nodes: list[fx.Node],
                    outputs: list[fx.Node]) -> tuple[fx.GraphModule, tuple]:
    """A GraphModule running ``nodes`` on ``inputs`` and returning ``outputs`` (a tuple), and its
    signature: the program up to node names."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    index: dict[fx.Node, int] = {}
    signature = []
    for i, a in enumerate(inputs):
        ph = graph.placeholder(a.name)
        ph.meta = dict(a.meta)
        env[a] = ph
        index[a] = i
        signature.append(("in", _value_key(a.meta.get("val")), repr(a.meta.get("autotp", {}).get("placement"))))
    for node in nodes:
        env[node] = graph.node_copy(node, lambda a: env[a])
        index[node] = len(index)
        args = pytree.tree_map(lambda a: ("n", index[a]) if isinstance(a, fx.Node) else _const_key(a),
                               (node.args, node.kwargs))
        signature.append((node.op, str(node.target), repr(args)))
    graph.output(tuple(env[n] for n in outputs))
    signature.append(("out", tuple(index[n] for n in outputs)))
    seg = fx.GraphModule(gm, graph)
    return seg, tuple(signature)


def _value_key(v) -> str:
    if isinstance(v, torch.Tensor):
        return f"{tuple(v.shape)}:{v.dtype}:{v.device.type}"
    return type(v).__name__


def _const_key(a):
    return repr(a) if not isinstance(a, torch.Tensor) else ("tensor", id(a))


# ---------------------------------------------------------------- the rank-local modules

def read_feed(feed):
    """The value a parameter, buffer or constant feed gives the graph now."""
    kind = feed[0]
    if kind == "param":
        p = getattr(feed[1], feed[2])
        if p.device_mesh.ndim > feed[3]:        # FSDP2's sharded (dp, tp) parameter, not unsharded
            raise _still_sharded(feed[4], p)
        if p.dtype != feed[5]:                  # not the traced dtype (FSDP2 mixed precision on an fp32 plan)
            raise _other_dtype(feed[4], p.dtype, feed[5])
        return p.to_local()
    if kind == "buffer":
        return getattr(feed[1], feed[2])
    return feed[1]


def _still_sharded(name: str, p) -> AutoTPError:
    return AutoTPError(f"parameter `{name}` is still sharded over the mesh {p.device_mesh.mesh_dim_names} "
                       f"({p.placements}) when the graph reads it: FSDP2 did not unshard it.  autotp reads a "
                       f"block's parameters inside the block's module (pmodel.blocks()), and the root's inside "
                       f"the root; a module given to fully_shard that is neither (a submodule of a layer), or a "
                       f"parameter read outside its block, is never unsharded in time.  Apply fully_shard to "
                       f"each of pmodel.blocks() and then to pmodel (docs/fsdp2.md)")


def _other_dtype(name: str, got: torch.dtype, planned: torch.dtype) -> AutoTPError:
    """A parameter whose dtype is not the one the graph was captured with.  The graph cannot be
    re-typed: a cast the model derives from its own tensors (RMSNorm's ``.to(input_dtype)``, the
    rotary table's ``cos.to(x.dtype)``) is a dtype constant in it, and export has merged a no-op
    ``x.to(float32)`` of the fp32 trace with ``x`` (Llama's residual reads the upcast copy)."""
    if got.itemsize < planned.itemsize:      # FSDP2's MixedPrecisionPolicy(param_dtype=bf16) on a plan made in fp32
        way_out = (f"plan in the dtype the parameters have when the graph runs: "
                   f"autotp.parallelize(model, ..., param_dtype={got}) keeps the {planned} master weights and plans "
                   f"the {got} forward, then fully_shard with the MixedPrecisionPolicy")
    else:
        way_out = (f"apply FSDP2's MixedPrecisionPolicy(param_dtype={planned}), which casts the parameters for the "
                   f"forward, or keep them in {planned} (pmodel.to({planned}))")
    return AutoTPError(f"parameter `{name}` is {got} when the graph reads it, but the plan was captured with "
                       f"{planned} parameters, and the captured graph keeps the dtype casts of its trace (RMSNorm's "
                       f"`.to(input_dtype)` is a constant {planned}): {way_out} (docs/fsdp2.md, 'Mixed precision')")


def share_children(module: nn.Module) -> nn.Module:
    """A shallow copy of ``module``: the same class and attributes, its own dicts of children,
    parameters, buffers and hooks (which hold the same objects), so replacing a child of the
    copy leaves ``module`` as it was."""
    copy = module.__class__.__new__(module.__class__)
    for k, v in module.__dict__.items():
        copy.__dict__[k] = type(v)(v) if isinstance(v, (dict, set)) else v
    return copy


class RankLocalBlock(nn.Module):
    """The forward of a block the plan cut: its part of the rewritten graph, on the activations
    the root passes and the block's own parameters (read at call time, so FSDP2's unsharded ones).
    Activation checkpointing wraps the graph, inside the module call, so module hooks (FSDP2's
    unshard and reshard) run once and the recompute reads the parameters FSDP2 unsharded for
    backward."""

    def forward(self, *activations):
        seg, feeds = self.__dict__["_autotp_run"]
        mode = self.__dict__.get("_autotp_checkpoint")

        def run(*acts):
            return seg.gm.forward(*acts, *(read_feed(f) for f in feeds))

        if mode is not None and self.training and torch.is_grad_enabled():
            return checkpoint(run, *activations, use_reentrant=False, context_fn=checkpoint_context(mode))
        return run(*activations)


_BLOCK_CLASSES: dict[type, type] = {}


def rank_local_block(module: nn.Module) -> nn.Module:
    """``module`` as a rank-local block: a shallow copy whose class is a subclass of its own
    (``isinstance(block, LlamaDecoderLayer)`` holds, as for FSDP2's ``FSDPLlamaDecoderLayer``)
    with ``RankLocalBlock``'s forward.  Forward hooks on the original stay with the original;
    a block's own checkpointing flag (Hugging Face's) is handled by autotp, so it is off here."""
    cls = type(module)
    if cls not in _BLOCK_CLASSES:
        try:
            _BLOCK_CLASSES[cls] = type(cls.__name__, (RankLocalBlock, cls), {"__module__": cls.__module__})
        except TypeError:                     # a class that cannot be subclassed this way
            _BLOCK_CLASSES[cls] = type(cls.__name__, (RankLocalBlock,), {})
    block = share_children(module)
    block.__class__ = _BLOCK_CLASSES[cls]
    for k in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
              "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs", "_forward_hooks_always_called"):
        if k in block.__dict__:
            block.__dict__[k] = type(block.__dict__[k])()
    block.__dict__["_compiled_call_impl"] = None
    if "gradient_checkpointing" in block.__dict__:
        block.__dict__["gradient_checkpointing"] = False
    return block


def checkpoint_mode(mode: str | None) -> str | None:
    if mode not in (None, "full", "selective"):
        raise AutoTPError(f"activation_checkpointing={mode!r}: use None, 'full' (recompute each block in "
                          f"backward) or 'selective' (save matmul, attention and collective outputs, recompute "
                          f"the rest)")
    return mode


def model_checkpointing(mode: str | None, model: nn.Module, slots: list, plan) -> str | None:
    """The activation checkpointing a ParallelModule starts with: ``mode``, or "full" when the
    model's own flag (Hugging Face's ``gradient_checkpointing``) is on; noted in the plan."""
    mode = checkpoint_mode(mode)
    flagged = any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())
    if mode is None and flagged:
        mode = "full"
        plan.ctx.note("the model has gradient checkpointing on: each block is recomputed in backward "
                      "(activation_checkpointing='full'; pass 'selective' to keep matmul and collective outputs)")
    if mode is not None and not any(slots):
        plan.ctx.note(f"activation_checkpointing={mode!r} asked for, but the graph has no repeated blocks to "
                      f"checkpoint: every activation is kept")
        return None
    return mode


def checkpoint_context(mode: str):
    """torch.utils.checkpoint's context for ``mode``: none for "full"; for "selective" the op-level
    policy (torchtitan's): matmuls, attention and collectives are saved, so backward recomputes
    only pointwise ops, norms and views, and runs no collective twice."""
    if mode == "full":
        return noop_context_fn
    return functools.partial(create_selective_checkpoint_contexts, _save_policy)


def _save_policy(ctx, op, *args, **kwargs):
    name = getattr(op, "name", lambda: str(op))()
    save = op in _SAVED_OPS or name.startswith("_c10d_functional::") or name.startswith("autotp::") \
        or "scaled_dot_product" in name or "grouped_mm" in name
    return CheckpointPolicy.MUST_SAVE if save else CheckpointPolicy.PREFER_RECOMPUTE


_SAVED_OPS = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default,
              torch.ops.aten.baddbmm.default, torch.ops.aten._scaled_mm.default}
