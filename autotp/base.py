"""The foundation both ``autotp/`` and ``autotp/passes/`` import: autotp's error, and the small fx
helpers that say where a node comes from (its module path, repeated block, layer index and the
user's source line).  It imports nothing of autotp's, so no module needs another just for these."""
from __future__ import annotations

import re

import torch.fx as fx


class AutoTPError(RuntimeError):
    """A model, input or option autotp cannot handle; the message says what to do."""


def where(node: fx.Node) -> str:
    """'node `linear_3` (aten.linear.default) in model.layers.0.mlp, at  File "...", line N'."""
    target = getattr(node.target, "__name__", str(node.target))
    if hasattr(node.target, "_schema"):
        target = str(node.target)
    text = f"node `{node.name}` ({target})"
    path = module_path(node)
    if path:
        text += f" in `{path}`"
    line = user_line(node)
    if line:
        text += f"\n  at {line}"
    return text


def module_path(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    return path.replace("L['self'].", "").replace("L['self']", "")


_LAYER = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")


def layer_index(path: str | None) -> int | None:
    """Decoder-layer index in a module path or parameter name (``model.layers.7.mlp`` -> 7)."""
    m = _LAYER.search(path or "")
    return int(m.group(1)) if m else None


def block_path(node: fx.Node) -> str | None:
    """The module path of the repeated block (a decoder layer) that ``node`` runs in, or None.

    A block is a module held in a list: the outermost entry of the node's module stack whose
    path ends in a list index (``model.layers.3``, ``encoder.block.0``).  PyTorch names the
    children of ``nn.ModuleList`` / ``nn.Sequential`` by their index, so this reads the model's
    structure, not its names.  Outermost: a MoE layer's list of experts stays inside its layer."""
    for path, _ in (node.meta.get("nn_module_stack") or {}).values():
        path = path.replace("L['self'].", "").replace("L['self']", "")
        if path.rpartition(".")[2].isdigit():
            return path
    return None


def node_layer(node: fx.Node, params: dict) -> int | None:
    """Decoder-layer index of a node: a parameter's name, or the node's module path."""
    return layer_index(params.get(node.name) if node.op == "placeholder" else module_path(node))


def user_line(node: fx.Node) -> str:
    """The innermost line of the user's model source that produced this node."""
    trace = node.meta.get("stack_trace") or ""
    lines = [ln.strip() for ln in trace.strip().splitlines()]
    frames = [(lines[i], lines[i + 1] if i + 1 < len(lines) else "") for i in range(len(lines))
              if lines[i].startswith("File ")]
    frames = [f for f in frames if "/torch/" not in f[0] and "/autotp/" not in f[0]]
    if not frames:
        return ""
    loc, code = frames[-1]
    return f"{loc}: {code}" if code else loc
