"""Pictures of a plan: each pass's graph as text and as a graphviz SVG, in pipeline order.

``dump(plan, out_dir)`` writes, numbered so that consecutive files diff cleanly:

    00_captured     the captured ATen graph (plain ops, no placements)
    01_placements   the same graph with the solver's placements (colour = placement)
    02_collectives  after ``insert_collectives`` (collectives in bold red, with their bytes)
    03_localized    after ``localize``: the graph each rank runs (local shapes)
    04_modules      one node per module: its weights' roles, and the collectives between modules

Each stage is ``NN_name.txt`` (one node per line), ``NN_name.dot`` and, when graphviz's ``dot``
binary is installed, ``NN_name.svg``.  With ``fold=True`` decoder layers 1..L-1 whose ops and
placements match layer 0 become one box, so an 80-layer model renders in seconds.
``AUTOTP_DUMP=dir`` does the same through ``dump_from_env(plan)``.
"""
from __future__ import annotations

import dataclasses
import os
import re
import shutil
import subprocess
import warnings
from pathlib import Path

import sympy
import torch
import torch.fx as fx

from autotp.placement import Partial, Replicate, fmt, is_shard
from autotp.passes import COLLECTIVE_PASSES
from autotp.base import module_path, node_layer

COLOURS = {"R": "#dddddd", "P": "#f6b26b", "S(0)": "#93c47d", "S(1)": "#6fa8dc", "S(2)": "#b4a7d6",
           "S(3)": "#ffd966", "-": "#ffffff"}
COLLECTIVE = dict(color="red", fontcolor="red", penwidth="3", style="filled,bold")


@dataclasses.dataclass
class Stage:
    name: str
    gm: fx.GraphModule
    placements: bool        # colour and label nodes by placement
    local: bool = False     # shapes are this rank's (sharded dims divided by the world size)


@dataclasses.dataclass
class Fold:
    """Which decoder layers are drawn and which are folded into a box.

    Layers are grouped by their op/placement sequence; the first layer of each group is drawn,
    the others of the group become one box ("x 79 identical layers").  Usually there is one
    group (layers 1..L-1 fold into layer 0); a solver that treats layer 0 differently gives two.
    """
    boxes: dict[int, list[int]] = dataclasses.field(default_factory=dict)   # drawn layer -> layers folded into it

    def __post_init__(self):
        self.into = {k: rep for rep, ks in self.boxes.items() for k in ks}

    def hides(self, layer: int | None) -> bool:
        return layer is not None and layer in self.into

    def box(self, layer: int) -> str:
        return f"fold_{self.into[layer]}"


# ---------------------------------------------------------------- public

def dump(plan, out_dir, *, fold: bool = True, max_svg_nodes: int = 3000) -> list[Path]:
    """Write every stage of ``plan`` to ``out_dir``; returns the files written, in order.

    A stage with more than ``max_svg_nodes`` drawn nodes (``fold=False`` on a deep model) gets
    its .txt and .dot but no SVG (``dot`` would take minutes), with a warning.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = []
    has_dot = shutil.which("dot") is not None
    if not has_dot:
        warnings.warn("graphviz `dot` not found: writing .dot files without SVG "
                      "(install graphviz, e.g. `apt install graphviz`, to render them)")
    stages = stages_of(plan)
    for stage in stages:
        folding = fold_layers(stage.gm, plan, stage.placements) if fold else Fold()
        files.append(_write(out / f"{stage.name}.txt", stage_text(stage, plan, folding)))
        files += _emit(*stage_dot(stage, plan, folding), out / stage.name, has_dot, max_svg_nodes)
    final = stages[-1].gm
    folding = fold_layers(final, plan) if fold else Fold()
    files.append(_write(out / "04_modules.txt", module_text(final, plan, folding)))
    files += _emit(*module_dot(final, plan, folding), out / "04_modules", has_dot, max_svg_nodes)
    return files


def dump_from_env(plan) -> list[Path]:
    """``dump(plan, $AUTOTP_DUMP)`` when the variable is set; nothing otherwise."""
    target = os.environ.get("AUTOTP_DUMP")
    return dump(plan, target) if target else []


def stages_of(plan) -> list[Stage]:
    """The graph after each pass, in pipeline order."""
    after = dict(plan.snapshots())              # the rewrite passes' graphs, as they ran
    return [Stage("00_captured", plan.captured.gm, placements=False),
            Stage("01_placements", plan.gm, placements=True),
            Stage("02_collectives", after[COLLECTIVE_PASSES[-1].__name__], placements=True),
            Stage("03_localized", plan.rewritten(), placements=True, local=True)]


# ---------------------------------------------------------------- layers and folding

def layer_of(node: fx.Node, plan) -> int | None:
    return node_layer(node, plan.ctx.params)


def _signature(node: fx.Node, plan, placements: bool) -> tuple:
    path = plan.ctx.params.get(node.name, "") if node.op == "placeholder" else module_path(node)
    info = node.meta.get("autotp", {})
    return (op_name(node), re.sub(r"\.\d+\.", ".K.", "." + path + "."),
            fmt(info.get("placement")) if placements else "", info.get("collective"))


def fold_layers(gm: fx.GraphModule, plan, placements: bool = True) -> Fold:
    """Group the decoder layers by op/placement sequence; the first of each group stays drawn."""
    seqs: dict[int, tuple] = {}
    for node in gm.graph.nodes:
        k = layer_of(node, plan)
        if k is not None:
            seqs.setdefault(k, []).append(_signature(node, plan, placements))
    first: dict[tuple, int] = {}
    boxes: dict[int, list[int]] = {}
    for k in sorted(seqs):
        rep = first.setdefault(tuple(seqs[k]), k)
        if rep != k:
            boxes.setdefault(rep, []).append(k)
    return Fold(boxes)


def fold_label(rep: int, folded: list[int], gm: fx.GraphModule, plan) -> str:
    ops = [n for n in gm.graph.nodes if layer_of(n, plan) == rep]
    comms = [n.meta["autotp"]["collective"] for n in ops if "collective" in n.meta.get("autotp", {})]
    text = (f"x {len(folded)} identical layers ({_ranges(folded)})\n"
            f"same ops and placements as layer {rep}: {len(ops)} nodes each")
    if comms:
        text += "\ncollectives per layer: " + ", ".join(comms)
    return text


# ---------------------------------------------------------------- node text

def op_name(node: fx.Node) -> str:
    if node.op == "placeholder":
        return "placeholder"
    if node.op == "output":
        return "output"
    target = node.target
    if hasattr(target, "_schema"):
        return str(target).replace("aten.", "").replace(".default", "")
    return getattr(target, "__name__", str(target))


def sym_shape(node: fx.Node, plan, local: bool = False) -> tuple | None:
    """The node's shape with export's size symbols named ``batch``/``seq``; local: divided by N."""
    v = node.meta.get("val")
    if not isinstance(v, torch.Tensor):
        return None
    dims = [sympy.sympify(s.node.expr).xreplace(plan.captured.symbols) if isinstance(s, torch.SymInt)
            else sympy.Integer(s) for s in v.shape]
    p = node.meta.get("autotp", {}).get("placement")
    if local and is_shard(p) and p.dim < len(dims):
        dims[p.dim] = dims[p.dim] / plan.world
    return tuple(dims)


def _shape_text(shape) -> str:
    return "-" if shape is None else "[" + ", ".join(str(s) for s in shape) + "]"


def collective_bytes(node: fx.Node, plan):
    """Bytes the collective moves (full tensor, the graph's dtype) as a sympy expression."""
    shape = sym_shape(node, plan)
    expr = sympy.Integer(node.meta["val"].dtype.itemsize)
    for s in shape or ():
        expr = expr * s
    return expr


def node_line(node: fx.Node, stage: Stage, plan, roles: dict) -> str:
    info = node.meta.get("autotp", {})
    p = fmt(info.get("placement")) if stage.placements else ""
    shape = _shape_text(sym_shape(node, plan, stage.local))
    if node.op == "placeholder":
        name = plan.ctx.params.get(node.name) or plan.ctx.buffers.get(node.name) or node.name
        kind = "param" if node.name in plan.ctx.params else "input"
        role = f"  {roles.get(name, '')}" if stage.placements and kind == "param" else ""
        return f"{node.name} = {kind} {name}  {p} {shape}{role}".replace("  ", " ", 1)
    if node.op == "output":
        return "output(" + ", ".join(a.name for a in node.all_input_nodes) + ")"
    args = ", ".join(a.name for a in node.all_input_nodes)
    text = f"{node.name} = {op_name(node)}({args})  {p} {shape}"
    if "collective" in info:
        text += (f"  [{info['collective']}: forward {info['forward'] or '-'}, backward {info['backward'] or '-'}, "
                 f"{collective_bytes(node, plan)} bytes] <- {info['reason']}")
    path = _module(node)
    return text + (f"  # {path}" if path != "(top level)" else "")


def stage_text(stage: Stage, plan, folding: Fold) -> str:
    roles = plan.roles() if stage.placements else {}
    lines = [f"# {stage.name}: world={plan.world}" + (" rank=0, local shapes" if stage.local else "")]
    said = set()
    for node in stage.gm.graph.nodes:
        layer = layer_of(node, plan)
        if folding.hides(layer):
            rep = folding.into[layer]
            if rep not in said:
                ks = folding.boxes[rep]
                lines.append(f"# ... layers {_ranges(ks)} ({len(ks)} layers): identical to layer {rep} "
                             f"(same ops and placements), folded ...")
                said.add(rep)
            continue
        lines.append(node_line(node, stage, plan, roles))
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- graphviz

def _placement_key(p) -> str:
    if isinstance(p, tuple):
        p = next((q for q in p if q is not None), None)
    if p is None:
        return "-"
    if isinstance(p, Replicate):
        return "R"
    if isinstance(p, Partial):
        return "P"
    return f"S({p.dim})" if is_shard(p) else "-"


def _colour(p) -> str:
    return COLOURS.get(_placement_key(p), "#e6b8af")


def _new_graph(title: str):
    import graphviz
    g = graphviz.Digraph(title, graph_attr=dict(rankdir="TB", label=title, labelloc="t", fontsize="20",
                                                fontname="Helvetica", nodesep="0.15", ranksep="0.25"),
                         node_attr=dict(shape="box", style="filled,rounded", fontname="Helvetica", fontsize="10"),
                         edge_attr=dict(arrowsize="0.6", color="#666666"))
    return g


def _legend(g, placements: bool) -> None:
    with g.subgraph(name="cluster_legend") as lg:
        lg.attr(label="legend", fontsize="12", style="dashed")
        keys = list(COLOURS) if placements else []
        for k in keys:
            text = {"R": "R  replicated", "P": "P  partial sum", "-": "-  no placement"}.get(k, f"{k}  sharded on dim "
                                                                                              f"{k[2:-1]}")
            lg.node(f"legend_{k}", text, fillcolor=COLOURS[k])
        lg.node("legend_coll", "collective\n(bold red, bytes)", fillcolor="#ffffff", **COLLECTIVE)
        lg.node("legend_fold", "folded layers", shape="box3d", fillcolor="#fff2cc", style="filled")


def _node_attrs(node: fx.Node, stage: Stage, plan, roles: dict) -> dict:
    info = node.meta.get("autotp", {})
    p = info.get("placement") if stage.placements else None
    pl = f"{fmt(p)} " if stage.placements else ""
    shape = _shape_text(sym_shape(node, plan, stage.local))
    if node.op == "placeholder":
        name = plan.ctx.params.get(node.name) or plan.ctx.buffers.get(node.name) or node.name
        role = roles.get(name, "") if stage.placements else ""
        role = role.replace("-parallel", "") if role else ""
        label = f"{name}\n{role + ' ' if role else ''}{pl}{shape}"
        return dict(label=label, shape="note", fillcolor=_colour(p) if stage.placements else "#ffffff")
    if node.op == "output":
        return dict(label="output", shape="oval", fillcolor="#ffffff")
    label = f"{node.name}: {op_name(node)}\n{pl}{shape}"
    if "collective" in info:
        label = (f"{info['collective']}\nfwd {info['forward'] or '-'} / bwd {info['backward'] or '-'}\n"
                 f"{collective_bytes(node, plan)} B ({str(node.meta['val'].dtype).replace('torch.', '')})\n"
                 f"{pl}{shape}")
        return dict(label=label, fillcolor=_colour(p), fontname="Helvetica-Bold", **COLLECTIVE)
    return dict(label=label, fillcolor=_colour(p) if stage.placements else "#ffffff")


def stage_dot(stage: Stage, plan, folding: Fold):
    """One stage as a graphviz Digraph: a node per op, layer 0 in a cluster, later layers folded."""
    g = _new_graph(f"{stage.name} (world {plan.world})")
    roles = plan.roles() if stage.placements else {}
    ident = {node: f"n{i}" for i, node in enumerate(stage.gm.graph.nodes)}

    def key(node: fx.Node) -> str:
        layer = layer_of(node, plan)
        return folding.box(layer) if folding.hides(layer) else ident[node]

    clusters: dict[int | None, list] = {}
    for node in stage.gm.graph.nodes:
        if not folding.hides(layer_of(node, plan)):
            clusters.setdefault(layer_of(node, plan), []).append(node)
    for layer, nodes in clusters.items():
        if layer is None:
            for node in nodes:
                g.node(ident[node], **_node_attrs(node, stage, plan, roles))
            continue
        with g.subgraph(name=f"cluster_layer_{layer}") as sg:
            sg.attr(label=f"decoder layer {layer}", style="rounded", color="#999999")
            for node in nodes:
                sg.node(ident[node], **_node_attrs(node, stage, plan, roles))
    for rep, ks in folding.boxes.items():
        g.node(f"fold_{rep}", fold_label(rep, ks, stage.gm, plan), shape="box3d", fillcolor="#fff2cc",
               style="filled", fontsize="14")
    edges = set()
    for node in stage.gm.graph.nodes:
        for src in node.all_input_nodes:
            e = (key(src), key(node))
            if e[0] != e[1] and e not in edges:
                edges.add(e)
                g.edge(*e)
    _legend(g, stage.placements)
    return g, sum(len(nodes) for nodes in clusters.values())


# ---------------------------------------------------------------- module overview

def _group(node: fx.Node, plan, folding: Fold) -> str | None:
    """The overview node a graph node belongs to: its module, its collective, the fold box."""
    layer = layer_of(node, plan)
    if folding.hides(layer):
        return folding.box(layer)
    if node.op == "placeholder":
        if node.name in plan.ctx.params:
            return None
        return "input " + (plan.ctx.buffers.get(node.name) or node.name)
    if "collective" in node.meta.get("autotp", {}):
        return node.name
    if node.op == "output":
        return "output"
    return _module(node)


def _module(node: fx.Node) -> str:
    """The node's module path; nodes export made outside any module (sizes) are top level."""
    path = module_path(node)
    return "(top level)" if not path or path.startswith("_empty_nn_module_stack") else path


def module_overview(gm: fx.GraphModule, plan, folding: Fold) -> tuple[dict, list, dict]:
    """(modules: path -> {params, ops}, edges [(src, dst)], collectives: name -> node)."""
    roles, placements = plan.roles(), plan.placements
    modules: dict[str, dict] = {}
    collectives, edges = {}, []
    for node in gm.graph.nodes:
        g = _group(node, plan, folding)
        if g is None or g.startswith("fold_"):
            continue
        if "collective" in node.meta.get("autotp", {}):
            collectives[g] = node
            continue
        modules.setdefault(g, dict(params=[], ops=0))["ops"] += node.op == "call_function"
    for placeholder, name in plan.ctx.params.items():
        mod = name.rsplit(".", 1)[0]
        if mod in modules:
            modules[mod]["params"].append(f"{name.rsplit('.', 1)[1]}: {roles.get(name, '?')} "
                                          f"{fmt(placements.get(name))}")
    seen = set()
    for node in gm.graph.nodes:
        dst = _group(node, plan, folding)
        for src_node in node.all_input_nodes:
            src = _group(src_node, plan, folding)
            if src is None or dst is None or src == dst or (src, dst) in seen:
                continue
            seen.add((src, dst))
            edges.append((src, dst))
    return modules, edges, collectives


def module_text(gm: fx.GraphModule, plan, folding: Fold) -> str:
    modules, edges, collectives = module_overview(gm, plan, folding)
    lines = [f"# 04_modules: world={plan.world}; one entry per module, collectives between them"]
    for path, m in modules.items():
        lines.append(path + (f"  ({m['ops']} ops)" if m["ops"] else ""))
        lines += [f"    {p}" for p in m["params"]]
    for rep, ks in folding.boxes.items():
        lines.append(f"[folded] layers {_ranges(ks)}: identical to layer {rep}")
    lines.append("# collectives")
    for name, node in collectives.items():
        info = node.meta["autotp"]
        srcs = [s for s, d in edges if d == name]
        dsts = [d for s, d in edges if s == name]
        lines.append(f"{', '.join(srcs)} -> {info['collective']} (fwd {info['forward'] or '-'}, bwd "
                     f"{info['backward'] or '-'}, {collective_bytes(node, plan)} B) -> {', '.join(dsts)}")
    return "\n".join(lines) + "\n"


def module_dot(gm: fx.GraphModule, plan, folding: Fold):
    modules, edges, collectives = module_overview(gm, plan, folding)
    g = _new_graph(f"04_modules (world {plan.world}): modules, weight roles, collectives")
    ident = {}
    for i, (path, m) in enumerate(modules.items()):
        ident[path] = f"m{i}"
        label = path + (f"\n({m['ops']} ops)" if m["ops"] else "") + "".join("\n" + p for p in m["params"])
        fill = "#ffffff"
        if any("column" in p for p in m["params"]):
            fill = COLOURS["S(0)"]
        elif any("row" in p for p in m["params"]):
            fill = COLOURS["S(1)"]
        elif any("vocab" in p for p in m["params"]):
            fill = COLOURS["S(2)"]
        g.node(ident[path], label, fillcolor=fill)
    for i, (name, node) in enumerate(collectives.items()):
        info = node.meta["autotp"]
        ident[name] = f"c{i}"
        g.node(ident[name], f"{info['collective']}\nfwd {info['forward'] or '-'} / bwd {info['backward'] or '-'}\n"
                            f"{collective_bytes(node, plan)} B", shape="oval", fillcolor="#ffffff",
               fontname="Helvetica-Bold", **COLLECTIVE)
    for rep, ks in folding.boxes.items():
        ident[f"fold_{rep}"] = f"fold_{rep}"
        g.node(f"fold_{rep}", fold_label(rep, ks, gm, plan), shape="box3d", fillcolor="#fff2cc", style="filled")
    for src, dst in edges:
        if src in ident and dst in ident:
            g.edge(ident[src], ident[dst])
    with g.subgraph(name="cluster_legend") as lg:
        lg.attr(label="legend", fontsize="12", style="dashed")
        lg.node("legend_col", "column-parallel weight", fillcolor=COLOURS["S(0)"])
        lg.node("legend_row", "row-parallel weight", fillcolor=COLOURS["S(1)"])
        lg.node("legend_vocab", "vocab-parallel weight", fillcolor=COLOURS["S(2)"])
        lg.node("legend_coll", "collective", shape="oval", fillcolor="#ffffff", **COLLECTIVE)
    return g, len(ident)


# ---------------------------------------------------------------- files

def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _emit(g, nodes: int, stem: Path, has_dot: bool, max_nodes: int) -> list[Path]:
    """``stem.dot``, and ``stem.svg`` rendered by ``dot`` when it is installed and the graph is not huge."""
    src = _write(stem.with_suffix(".dot"), g.source)
    if not has_dot:
        return [src]
    if nodes > max_nodes:
        warnings.warn(f"{stem.name}: {nodes} nodes is more than max_svg_nodes={max_nodes}; wrote .txt and .dot "
                      f"only (dump with fold=True, or raise max_svg_nodes and wait for dot)")
        return [src]
    svg = stem.with_suffix(".svg")
    subprocess.run(["dot", "-Tsvg", str(src), "-o", str(svg)], check=True, capture_output=True)
    return [src, svg]


def _ranges(xs: list[int]) -> str:
    out, start = [], None
    for i, x in enumerate(xs):
        start = x if start is None else start
        if i + 1 == len(xs) or xs[i + 1] != x + 1:
            out.append(f"{start}" if start == x else f"{start}-{x}")
            start = None
    return ", ".join(out)
