"""Weights at real sizes: start on the meta device, load each rank's slices, gather for saving.

    with autotp.init_empty_weights():            # parameters on meta, buffers real
        model = AutoModelForCausalLM.from_config(cfg)
    pmodel = autotp.parallelize(model, (ids,))
    autotp.load_checkpoint(pmodel, "ckpt_dir")    # each rank reads only its own slices

A 70B model never exists whole on one rank: ``load_checkpoint`` opens Hugging Face safetensors
files (one file, or shards listed in ``model.safetensors.index.json``) and reads, for every
parameter, exactly the rows/columns its placement gives this rank (``safe_open.get_slice``).
Everything is checked before anything is loaded — names, shapes, dtypes — so a bad
checkpoint fails with one error listing every problem, and nothing is half-loaded.

A checkpoint in a layout transformers converts when it loads (Mixtral's experts saved one by
one, ``block_sparse_moe.experts.{e}.w1``, for the stacked ``mlp.experts.gate_up_proj``) is read
through transformers' own conversion mapping: a renamed tensor is still read slice by slice;
experts stacked from one tensor each are read for this rank's experts only; any other merged
tensor is read whole, converted, and this rank's part kept (one parameter at a time).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
from pathlib import Path

import torch
import torch.nn as nn
from torch.distributed.tensor import DTensor

from autotp.base import AutoTPError
from autotp.placement import Grid, R, is_shard, join_pieces, local_chunk, local_slices, split_factor
from autotp.program import mesh_for

__all__ = ["init_empty_weights", "load_checkpoint", "full_state_dict", "LoadReport"]

_SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
                       "I64": torch.int64, "I32": torch.int32, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


@contextlib.contextmanager
def init_empty_weights():
    """Create modules with parameters on the meta device (no memory) and buffers as usual
    (rotary tables and other non-persistent buffers are computed at init and not in checkpoints)."""
    register = nn.Module.register_parameter

    def on_meta(self, name, param):
        register(self, name, param)
        p = self._parameters[name]
        if p is not None and p.device.type != "meta":    # tying re-registers a meta parameter: keep it
            self._parameters[name] = nn.Parameter(p.to("meta"), requires_grad=p.requires_grad)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def materialize_buffers(model: nn.Module, device: torch.device) -> list[str]:
    """Give real values to the buffers a model built under ``torch.device("meta")`` left on the
    meta device (rotary tables: computed at init, not in checkpoints), on ``device``.

    They are recomputed by the model's own initialisation code (``model._init_weights(module)``,
    Hugging Face's, which recomputes rotary tables from the module's config), one module at a time
    and only for modules whose parameters are all on meta (their weights come from the checkpoint
    later).  Each buffer is filled with NaN first and checked after: one the code did not write is
    an error naming it, never a silent garbage value.  Returns the names of the buffers made."""
    todo: dict[nn.Module, list[str]] = {}
    names = {}
    for module_name, module in model.named_modules():
        for attr, b in module._buffers.items():
            if b is not None and b.is_meta:
                todo.setdefault(module, []).append(attr)
                names[(id(module), attr)] = f"{module_name}.{attr}" if module_name else attr
    if not todo:
        return []
    init = getattr(model, "_init_weights", None)
    failed = []
    for module, attrs in todo.items():
        real_params = any(not p.is_meta for p in module.parameters(recurse=False))
        if init is None or real_params or any(not module._buffers[a].is_floating_point() for a in attrs):
            failed += [names[(id(module), a)] for a in attrs]
            continue
        for a in attrs:
            b = module._buffers[a]
            module._buffers[a] = torch.full(b.shape, float("nan"), dtype=b.dtype, device=device)
        with torch.no_grad():
            init(module)
        for a in attrs:
            if module._buffers[a].is_meta or torch.isnan(module._buffers[a]).any():
                failed.append(names[(id(module), a)])
    if failed:
        raise AutoTPError(f"buffer(s) {failed} are on the meta device and the model's own initialisation code "
                          f"(`_init_weights`) does not compute them: build the model under "
                          f"`autotp.init_empty_weights()` instead of `torch.device('meta')` (parameters on meta, "
                          f"buffers computed as usual), or give the buffers real values before parallelize")
    return sorted(names.values())


@dataclasses.dataclass
class LoadReport:
    loaded: list[str]            # parameter names loaded
    bytes_read: int              # bytes this rank read from disk
    files: list[str]             # files opened
    unused: list[str]            # checkpoint tensors no parameter asked for


def _weight_map(path: Path) -> dict[str, Path]:
    """Tensor name -> file, for a .safetensors file, an index .json, or a directory of either."""
    if path.is_dir():
        index = path / "model.safetensors.index.json"
        if index.exists():
            path = index
        elif (path / "model.safetensors").exists():
            path = path / "model.safetensors"
        else:
            raise AutoTPError(f"{path} holds neither model.safetensors nor model.safetensors.index.json")
    if path.suffix == ".json":
        try:
            mapping = json.loads(path.read_text())["weight_map"]
        except (OSError, ValueError, KeyError) as e:
            raise AutoTPError(f"cannot read the checkpoint index {path}: {e}") from e
        return {name: path.parent / f for name, f in mapping.items()}
    if path.suffix != ".safetensors":
        raise AutoTPError(f"{path}: autotp loads safetensors checkpoints only (no pickle); convert with "
                          f"safetensors.torch.save_file")
    from safetensors import safe_open
    try:
        with safe_open(path, framework="pt") as f:
            return {name: path for name in f.keys()}
    except Exception as e:  # noqa: BLE001 — a truncated or corrupt file
        raise AutoTPError(f"cannot open {path} as safetensors ({type(e).__name__}: {e}); the file is truncated "
                          f"or corrupt — nothing was loaded") from e


def load_checkpoint(pmodel, path, *, allow_dtype_cast: bool = False, device=None) -> LoadReport:
    """Load a Hugging Face safetensors checkpoint into a parallelised model, reading only this
    rank's slices.  Tied parameters may be stored under any one of their names."""
    from safetensors import safe_open
    path = Path(path)
    where = _weight_map(path)
    mesh = pmodel.mesh
    rank, world = mesh.get_local_rank(), mesh.size()
    placements = pmodel.plan.placements
    aliases = pmodel.plan.aliases
    params = dict(pmodel.named_parameters())
    # ---- check everything first ----
    plan, problems, used = {}, [], set()
    absent = [name for name in params if not any(n in where for n in aliases.get(name, [name]))]
    renamed, merged = _hf_layout(pmodel, where, absent) if absent else ({}, {})
    for name, param in params.items():
        stored = next((n for n in aliases.get(name, [name]) if n in where), None) or renamed.get(name)
        if stored is None and name in merged:
            used.update(key for key, _ in merged[name][1])
            continue
        if stored is None:
            problems.append(f"missing: {name} (shape {list(param.shape)})")
            continue
        plan[name] = stored
        used.add(stored)
    headers = {}
    for file in sorted({where[s] for s in plan.values()} | {where[k] for _, keys in merged.values() for k, _ in keys}):
        try:
            with safe_open(file, framework="pt") as f:
                for key in f.keys():
                    sl = f.get_slice(key)
                    headers[key] = (list(sl.get_shape()), sl.get_dtype())
        except Exception as e:  # noqa: BLE001
            raise AutoTPError(f"cannot read {file} ({type(e).__name__}: {e}); the file is truncated or corrupt "
                              f"— nothing was loaded") from e
    _dtypes = _SAFETENSORS_DTYPES
    for name, stored in plan.items():
        shape, dtype = headers.get(stored, (None, None))
        want = params[name]
        if shape is None:
            problems.append(f"missing: {stored} is listed in the index but not in {where[stored].name}")
        elif shape != list(want.shape):
            problems.append(f"shape: {stored} is {shape} in the checkpoint, the model wants {list(want.shape)}")
        elif _dtypes.get(dtype) != want.dtype and not allow_dtype_cast:
            problems.append(f"dtype: {stored} is {dtype} in the checkpoint, the model is {want.dtype} "
                            f"(pass allow_dtype_cast=True to convert)")
    for name, (converter, keys) in merged.items():     # convert on meta tensors: the shapes, nothing read
        shape = list(_convert(pmodel, name, converter, keys, lambda k: torch.empty(
            headers[k][0], dtype=_dtypes.get(headers[k][1], torch.float32), device="meta")).shape)
        if shape != list(params[name].shape):
            problems.append(f"shape: {name} is {shape} after transformers' conversion of {keys[0][0]}, ... "
                            f"({len(keys)} tensors), the model wants {list(params[name].shape)}")
    if problems:
        raise AutoTPError(f"checkpoint {path} does not fit the model ({len(problems)} problem(s)); nothing was "
                          f"loaded:\n  " + "\n  ".join(problems))
    # ---- then load, each rank its own slices ----
    read, files = 0, set()
    new_params: dict[str, nn.Parameter] = {}
    by_file: dict[Path, list[str]] = {}
    for name, stored in plan.items():
        by_file.setdefault(where[stored], []).append(name)
    for file, names in by_file.items():
        files.add(str(file))
        with safe_open(file, framework="pt") as f:
            for name in names:
                param = params[name]
                placement = placements.get(name, R)
                sl = f.get_slice(plan[name])
                slices = local_slices(list(param.shape), placement, rank, world)
                local = join_pieces([sl[idx] for idx in slices], slices)   # the blocks of a fused dim, joined
                read += local.numel() * local.element_size()
                new_params[name] = _as_param(local, param, placement, mesh, device)
    with contextlib.ExitStack() as stack:
        handles: dict = {}

        def read_whole(key: str) -> torch.Tensor:
            if where[key] not in handles:
                handles[where[key]] = stack.enter_context(safe_open(where[key], framework="pt"))
                files.add(str(where[key]))
            return handles[where[key]].get_tensor(key)

        for name, (converter, keys) in merged.items():   # read, convert, keep this rank's slice
            param, placement = params[name], placements.get(name, R)
            mine, rest, sub_rank, sub_world = _own_experts(converter, keys, placement, rank, world)
            full = _convert(pmodel, name, converter, mine, read_whole)
            read += sum(_stored_bytes(headers[k]) for k, _ in mine)
            new_params[name] = _as_param(local_chunk(full, rest, sub_rank, sub_world), param, placement, mesh, device)
            del full
    for name, p in new_params.items():
        for alias in aliases.get(name, [name]):
            module_name, _, attr = alias.rpartition(".")
            owner = pmodel.get_submodule(module_name) if module_name else pmodel
            setattr(owner, attr, p)
    return LoadReport(sorted(new_params), read, sorted(files), sorted(set(where) - used))


def _stored_bytes(header) -> int:
    """Bytes of a checkpoint tensor from its safetensors header (shape, dtype name)."""
    shape, dtype = header
    return torch.Size(shape).numel() * _SAFETENSORS_DTYPES.get(dtype, torch.float32).itemsize


def _as_param(local: torch.Tensor, param, placement, mesh, device) -> nn.Parameter:
    """This rank's piece ``local`` as the parameter ``param`` becomes: on ``device`` (default the
    parameter's, CPU for a meta one), in its dtype, a DTensor in its placement."""
    target = device or (param.device if param.device.type != "meta" else "cpu")
    local = local.to(device=target, dtype=param.dtype).contiguous()
    dt = DTensor.from_local(local, *mesh_for(mesh, placement), run_check=False, shape=param.shape,
                            stride=param.stride())
    return nn.Parameter(dt, requires_grad=param.requires_grad)


def _hf_layout(pmodel, where: dict, absent: list[str]) -> tuple[dict, dict]:
    """For parameters the checkpoint does not hold under their own names: the layout transformers
    itself converts when it loads this family (``conversion_mapping``: Mixtral's per-expert
    ``block_sparse_moe.experts.{e}.w1/w2/w3`` into stacked ``mlp.experts.gate_up_proj`` /
    ``down_proj``, renamed modules, ...).  Returns ``renamed`` (parameter -> the checkpoint key
    that only has another name: still read slice by slice) and ``merged`` (parameter ->
    (transformers' converter, [(checkpoint key, source pattern)] in transformers' order)).
    Empty when the model is not a transformers model or transformers has no mapping for it."""
    model = getattr(pmodel, "source_model", None)
    try:
        from transformers import PreTrainedModel
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, dot_natural_key, rename_source_key
    except ImportError:
        return {}, {}
    if not isinstance(model, PreTrainedModel):
        return {}, {}
    mapping = get_model_conversion_mapping(model)
    renamings = [m for m in mapping if isinstance(m, WeightRenaming)]
    converters = [m for m in mapping if isinstance(m, WeightConverter)]
    if not mapping:
        return {}, {}
    wanted = set(absent)
    names = {n: True for n, _ in model.named_parameters(remove_duplicate=False)}
    renamed, merged = {}, {}
    by_pattern = {pattern: c for c in converters for pattern in c.source_patterns}
    for key in sorted(where, key=dot_natural_key):      # transformers' order: experts 0, 1, 2, ..., 10
        target, pattern = rename_source_key(key, renamings, converters, model.base_model_prefix, names)
        if target not in wanted:
            continue
        if pattern is None:
            renamed[target] = key
        else:
            merged.setdefault(target, (by_pattern[pattern], []))[1].append((key, pattern))
    return renamed, merged


def _own_experts(converter, keys: list, placement, rank: int, world: int):
    """Under expert parallelism (``S(0)``, or a grid's ``S(0)·...``) a rank holds E/groups whole
    experts; when transformers stacks them from one tensor per expert (its first op merges the
    list along dim 0), read only this rank's experts' tensors.  Returns (keys to read, the
    placement left to apply to the converted tensor, and the rank and world it applies over)."""
    from transformers.core_model_loading import MergeModulelist
    ops = getattr(converter, "operations", [])
    outer = placement.outer if isinstance(placement, Grid) else placement
    if not (ops and isinstance(ops[0], MergeModulelist) and ops[0].dim == 0 and is_shard(outer) and outer.dim == 0
            and split_factor(outer) == 1):
        return keys, placement, rank, world
    groups = placement.groups if isinstance(placement, Grid) else world
    per_pattern: dict = {}
    for key, pattern in keys:
        per_pattern.setdefault(pattern, []).append((key, pattern))
    if len({len(v) for v in per_pattern.values()}) != 1 or len(next(iter(per_pattern.values()))) % groups:
        return keys, placement, rank, world
    b = world // groups
    mine = []
    for items in per_pattern.values():             # expert e's tensor is the e-th of each pattern
        per = len(items) // groups
        mine += items[(rank // b) * per:(rank // b + 1) * per]
    if isinstance(placement, Grid):
        return mine, placement.inner, rank % b, b
    return mine, R, 0, 1


def _convert(pmodel, name: str, converter, keys: list, read) -> torch.Tensor:
    """Parameter ``name`` built from checkpoint tensors ``keys`` by transformers' own converter
    (a fresh copy of it; ``read(key)`` gives each tensor)."""
    import copy
    conv = copy.deepcopy(converter)
    for key, pattern in keys:
        conv.add_tensor(name, key, pattern, lambda key=key: read(key))
    model = pmodel.source_model
    out = conv.convert(name, model=model, config=model.config)
    value = out.get(name, next(iter(out.values())))
    return value[0] if isinstance(value, list) else value


def full_state_dict(pmodel, *, to_cpu: bool = True) -> dict[str, torch.Tensor]:
    """Every parameter and persistent buffer gathered to full plain tensors, under the original
    names (tied weights under each name), ready for ``model.load_state_dict`` or
    ``save_pretrained``.  A collective: call it on every rank."""
    out = {}
    for name, value in pmodel.state_dict().items():
        if isinstance(value, DTensor):
            value = value.full_tensor()
        out[name] = value.detach().cpu() if to_cpu else value.detach()
    return out
