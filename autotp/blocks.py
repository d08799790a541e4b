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

import torch
import torch.fx as fx
from torch.utils import _pytree as pytree

from autotp.passes.context import block_path


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
        owned = [a for a in external if key is not None and a.op == "placeholder"
                 and owner_of.get(a.name, "").startswith(key + ".")]
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
