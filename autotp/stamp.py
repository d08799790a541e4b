"""Repeated layers: export a few, stamp the rest.

``torch.export`` traces every decoder layer of an 80-layer model one by one (~0.2 s each on a
2-core CPU): most of planning time.  The layers are the same code on the same shapes, so autotp
exports a *sample* — the model with its layer list cut to layers ``[0, 1, 2, L-1]`` — and builds
the full graph by copying the graph of layer 1 for layers 1 .. L-1, each with its own
parameters.  Nothing is assumed; it is checked, and any doubt falls back to exporting everything:

* the layers 1 .. L-1 are the same class with the same submodule classes, the same plain
  attributes (numbers, strings, flags: everything but ``layer_idx``) and parameters and
  buffers of the same names, shapes and dtypes; per-layer lists in the config are constant
  over them;
* in the sample, layers 1, 2 and L-1 give the same graph: node for node the same op, the same
  arguments (the same outside tensors, their own parameters, the previous layer's nodes) and the
  same symbolic shapes — so neither the layer's position nor its index changes the trace;
* the layers' nodes form contiguous blocks in order, and nothing outside the layers (the
  model's outputs included) reads a layer other than the last;
* no config setting names a layer count between 3 and L-2 (a loop that branches on the layer
  index after the sample's positions would go unseen; per-layer differences in transformers
  live in the modules or in per-layer config lists, both checked).

The stamped graph is what exporting all L layers gives, up to node names.
"""
from __future__ import annotations

import contextlib
import re

import torch
import torch.fx as fx

MIN_LAYERS = 6                  # below this, exporting all layers costs about as much as the sample
_IGNORED_ATTRS = {"layer_idx", "training"}
_LAYER_COUNT_WORDS = ("layer", "dense", "replace", "interval", "freq", "every", "period", "pattern", "step")


def repeated_layers(model: torch.nn.Module) -> tuple[str, torch.nn.ModuleList] | None:
    """The model's longest ``ModuleList`` of layers that look identical (``MIN_LAYERS`` or more)."""
    best = None
    for path, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) >= MIN_LAYERS:
            n_params = sum(1 for _ in module.parameters())
            if n_params and (best is None or n_params > best[2]):
                best = (path, module, n_params)
    if best is None:
        return None
    path, layers, _ = best
    first = _static_signature(layers[1])
    if any(_static_signature(layer) != first for layer in list(layers)[2:]):
        return None
    return path, layers


def _static_signature(layer: torch.nn.Module) -> tuple:
    """What the layer's trace can depend on besides its inputs: module classes, plain attributes,
    functions set on the instance (a replaced ``forward``), hooks, parameter and buffer metadata."""
    out = []
    for name, m in layer.named_modules():
        attrs = []
        for k, v in vars(m).items():
            if k.startswith("_") or k in _IGNORED_ATTRS:
                continue
            if isinstance(v, (int, float, str, bool, type(None), tuple, list)):
                attrs.append((k, repr(v)))
            elif callable(v) and not isinstance(v, torch.nn.Module):
                attrs.append((k, id(getattr(v, "__code__", getattr(getattr(v, "__func__", None), "__code__", v)))))
        hooks = tuple(id(getattr(h, "__code__", h)) for d in (m._forward_pre_hooks, m._forward_hooks) for h in d.values())
        out.append((name, type(m).__qualname__, tuple(sorted(attrs)), hooks))
    out.append(tuple((n, tuple(p.shape), p.dtype, p.device, p.requires_grad) for n, p in layer.named_parameters()))
    out.append(tuple((n, tuple(b.shape), b.dtype, b.device) for n, b in layer.named_buffers()))
    return tuple(out)


def config_uniform(model: torch.nn.Module, n: int) -> bool:
    """Per-layer lists in the config (``layer_types``, ...) are the same for layers 1 .. n-1,
    and no layer-count setting (``first_k_dense_replace``, ``moe_layer_freq``, ...) could make
    a layer past the sample's behave differently: the model's loop sees the sample's layers at
    positions 0-3, so a branch on the loop index that only changes after position 3 would go
    unseen."""
    cfg = getattr(model, "config", None)
    if cfg is None:
        return True
    settings = vars(cfg)
    per_layer_types = isinstance(settings.get("layer_types"), (list, tuple))
    for key, value in settings.items():
        if isinstance(value, (list, tuple)) and len(value) == n and len({repr(v) for v in value[1:]}) > 1:
            return False
        if not isinstance(value, int) or isinstance(value, bool) or not 2 < value < n - 1 or \
                key in ("num_hidden_layers", "n_layer", "num_layers"):
            continue
        if per_layer_types and "window" in key:
            continue                  # sliding-window layers: spelled out in layer_types, checked above
        if any(w in key for w in _LAYER_COUNT_WORDS):
            return False
    return True


@contextlib.contextmanager
def sample_of(layers: torch.nn.ModuleList):
    """Cut ``layers`` to ``[0, 1, 2, L-1]`` while the sample is exported."""
    saved = layers._modules
    n = len(layers)
    layers._modules = type(saved)((str(i), saved[str(k)]) for i, k in enumerate((0, 1, 2, n - 1)))
    try:
        yield
    finally:
        layers._modules = saved


class Doubt(Exception):
    """The sample does not prove the layers identical: export them all."""


def stamp(gm: fx.GraphModule, params: dict, buffers: dict, path: str, n: int,
          constants: dict | None = None) -> tuple[fx.GraphModule, dict, dict]:
    """The graph of all ``n`` layers from the sample's (layers 0, 1, 2, n-1 at positions 0-3).
    Returns (graph module, placeholder -> parameter name, placeholder -> buffer name); raises
    ``Doubt`` when the sample does not prove the layers identical."""
    layer_re = re.compile(rf"^{re.escape(path)}\.(\d+)(\.|$)")

    def pos_of(node: fx.Node):
        if node.op == "placeholder":
            name = params.get(node.name) or buffers.get(node.name)
            m = layer_re.match(name) if name else None
            return int(m.group(1)) if m else None
        stack = node.meta.get("nn_module_stack") or {}
        for _, (mpath, _cls) in reversed(list(stack.items())):
            m = layer_re.match(mpath)
            if m:
                return int(m.group(1))
        return None

    nodes = list(gm.graph.nodes)
    pos = {node: pos_of(node) for node in nodes}
    blocks: dict[int, list[fx.Node]] = {k: [] for k in range(4)}
    order = []
    for node in nodes:
        if node.op == "placeholder":
            continue
        p = pos[node]
        if p is not None:
            blocks[p].append(node)
            if not order or order[-1] != p:
                order.append(p)
    if order != [0, 1, 2, 3]:
        raise Doubt(f"layer blocks not contiguous: {order}")
    first, last = blocks[0][0], blocks[3][-1]
    inside = False
    for node in nodes:                       # no outside node between the layers
        inside = inside or node is first
        if inside and node.op != "placeholder" and pos[node] is None:
            raise Doubt(f"{node.name} between layers")
        if node is last:
            break
    local = {k: {node: i for i, node in enumerate(blocks[k])} for k in range(4)}

    def rel_name(node: fx.Node, k: int) -> str | None:
        name = params.get(node.name) or buffers.get(node.name)
        prefix = f"{path}.{k}."
        return name[len(prefix):] if name and name.startswith(prefix) else None

    def code(k: int) -> list:
        """Layer k's nodes with every input named relative to the layer."""
        def ref(a):
            if not isinstance(a, fx.Node):
                return a
            if a in local[k]:
                return ("own", local[k][a])
            if _is_size(a):                   # a size export computed once, in an earlier layer
                return ("size", a.name)
            if constants and a.name in constants:  # a tensor constant the layer's code made: by value
                return ("constant", _value_key(constants[a.name]))
            if k > 0 and a in local[k - 1]:           # counted from the end: layer 0 may be longer
                return ("prev", len(blocks[k - 1]) - 1 - local[k - 1][a])
            if pos[a] is None:
                return ("outside", a.name)
            if a.op == "placeholder" and pos[a] == k:
                return ("param", rel_name(a, k))
            raise Doubt(f"layer {k} reads layer {pos[a]}")
        out = []
        for node in blocks[k]:
            args = fx.node.map_aggregate(node.args, ref)
            kwargs = fx.node.map_aggregate(node.kwargs, ref)
            v = node.meta.get("val")
            shape = _shape_key(v)
            out.append((node.op, str(node.target), repr(args), repr(kwargs), shape))
        return out

    template = code(1)
    for k in (2, 3):
        other = code(k)
        if other != template:
            first = next((i for i, (a, b) in enumerate(zip(template, other)) if a != b), min(len(template), len(other)))
            raise Doubt(f"layer at sample position {k} traces differently from layer 1 (node {first} of "
                        f"{len(template)} vs {len(other)}: {template[first:first + 1]} vs {other[first:first + 1]})")
    for node in nodes:                        # only the last layer is read from outside the layers
        if pos[node] is None and node.op != "placeholder":
            for a in node.all_input_nodes:
                if pos[a] in (1, 2):
                    raise Doubt(f"{node.name} reads a middle layer")
    # ---- build: prologue, layer 0, stamps of layer 1 for 1 .. n-1, epilogue ----
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    new_params, new_buffers = {}, {}
    template_ph = [ph for ph in nodes if ph.op == "placeholder" and pos[ph] == 1]
    stamped_ph: dict[int, dict[str, fx.Node]] = {}

    def copy_placeholder(ph: fx.Node, name: str, target: str | None) -> fx.Node:
        new = graph.placeholder(name)
        new.meta = dict(ph.meta)
        if ph.name in params:
            new_params[new.name] = target
        elif ph.name in buffers:
            new_buffers[new.name] = target
        return new

    for ph in nodes:            # in order; layer 1's place gets every stamped layer's inputs
        if ph.op != "placeholder" or pos[ph] in (2, 3) or (pos[ph] == 1 and stamped_ph):
            continue
        if pos[ph] is None or pos[ph] == 0:
            env[ph] = copy_placeholder(ph, ph.name, params.get(ph.name) or buffers.get(ph.name))
            continue
        for i in range(1, n):
            stamped_ph[i] = {}
            for tph in template_ph:
                rel, full = rel_name(tph, 1), f"{path}.{i}.{rel_name(tph, 1)}"
                prefix = "p_" if tph.name in params else "b_"
                stamped_ph[i][rel] = copy_placeholder(tph, prefix + full.replace(".", "_"), full)
    for node in nodes:
        if node.op == "placeholder" or pos[node] in (1, 2, 3):
            continue
        env[node] = graph.node_copy(node, lambda a: env[a])
        if node is blocks[0][-1]:
            prev = [env[x] for x in blocks[0]]
            for i in range(1, n):
                prev = _stamp_layer(graph, blocks[1], local[1], local[0], prev, stamped_ph[i], env, path, i,
                                    lambda a: rel_name(a, 1))
            # the model's epilogue reads the sample's last layer: the last stamp, node for node
            env.update(zip(blocks[3], prev))
    graph.lint()
    return fx.GraphModule(gm, graph), new_params, new_buffers


def _stamp_layer(graph: fx.Graph, template: list, index: dict, prev_index: dict, prev: list, own_params: dict,
                 env: dict, path: str, i: int, rel_name) -> list:
    """Copy the template layer's nodes as layer ``i``: its inputs from the previous layer's
    copies (``prev``, in the order ``prev_index`` numbers the template's previous layer), its own
    parameters, and the same outside nodes."""
    mine: list[fx.Node] = []

    def arg(a: fx.Node) -> fx.Node:
        if a in index:
            return mine[index[a]]
        if _is_size(a):
            return env[a]
        if a in prev_index:                   # the same node counted from the previous layer's end
            return prev[len(prev) - len(prev_index) + prev_index[a]]
        if a.op == "placeholder":
            rel = rel_name(a)
            if rel is not None:
                return own_params[rel]
        return env[a]

    layer_re = re.compile(rf"{re.escape(path)}\.1(?=\.|$|')")
    for node in template:
        new = graph.node_copy(node, arg)
        stack = node.meta.get("nn_module_stack")
        if stack:
            new.meta["nn_module_stack"] = {layer_re.sub(f"{path}.{i}", key): (layer_re.sub(f"{path}.{i}", mp), cls)
                                           for key, (mp, cls) in stack.items()}
        mine.append(new)
    return mine


def _is_size(node: fx.Node) -> bool:
    """A symbolic size (``sym_size`` and arithmetic on it): the same value in every layer."""
    return isinstance(node.meta.get("val"), (torch.SymInt, int)) and node.op != "placeholder"


def _value_key(t) -> str:
    if isinstance(t, torch.Tensor) and t.numel() <= 4096:
        return f"{t.dtype}{tuple(t.shape)}{t.tolist()}"
    return f"object {id(t)}"


def _shape_key(v) -> str:
    if isinstance(v, torch.Tensor):
        return f"{tuple(str(s) for s in v.shape)}:{v.dtype}"
    if isinstance(v, (tuple, list)):
        return "(" + ",".join(_shape_key(x) for x in v) + ")"
    return type(v).__name__
