"""Train a Hugging Face causal LM with autotp (tensor parallel) x FSDP2 (data parallel), start to resume.

    python -m torch.distributed.run --nproc-per-node 4 examples/train.py \
        --model examples/configs/llama-tiny.json --dp 2 --tp 2 --steps 20 \
        --ckpt-dir out/ckpt --ckpt-every 10 [--resume] [--dtype bf16] [--activation-checkpointing full]

* Model: a config json (random weights, the same seed on every rank) or a local Hugging Face
  checkpoint dir (config.json + safetensors): built on the meta device, planned there, then each
  rank reads only its slices (``autotp.load_checkpoint``).
* Mesh (dp, tp): autotp splits the matrices over "tp", ``fully_shard`` per layer over "dp".
* ``--dtype bf16``: the model itself in bf16 (weights, gradients and AdamW state; no fp32 master
  copy), planned in bf16, so every collective moves bf16.  ``--dtype fp32``: everything fp32.
  ``--dtype bf16-mixed`` (dp > 1): the model in fp32 (master weights and AdamW state),
  ``parallelize(..., param_dtype=torch.bfloat16)`` plans the bf16 forward, and FSDP2's
  ``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)`` casts each layer's gathered
  weights to bf16 and reduces gradients in fp32 (torchtitan's way).  The plan must be made in
  bf16: the captured graph keeps the dtype casts it was traced with (RMSNorm's ``.to(input_dtype)``);
  a plan made in fp32 raises an AutoTPError at the first forward (docs/fsdp2.md, "Mixed precision").
* Loss: vocab-parallel. The logits stay split over tp (``sharded_outputs=True``) and
  ``autotp.cross_entropy`` computes the exact loss from the slices: no (batch, seq, vocab) gather.
* Data: a token corpus (``--data`` a .npy of token ids, or a .bin of uint16 ids as nanoGPT writes
  them; default a seeded random corpus), windows drawn by a generator seeded with the step, so a
  resumed run sees the batches the uninterrupted one would.  Each dp rank takes its rows.
* AdamW, linear warmup then cosine decay to 10%, ``autotp.clip_grad_norm_``, a DCP checkpoint
  (model, optimizer, step) every ``--ckpt-every`` steps, ``--resume`` from the latest.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

import autotp

# --dtype -> (the parameters' dtype: master weights, gradients, AdamW state; the forward's)
DTYPES = {"fp32": (torch.float32, torch.float32), "bf16": (torch.bfloat16, torch.bfloat16),
          "bf16-mixed": (torch.float32, torch.bfloat16)}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="examples/configs/llama-tiny.json", help="config json or checkpoint dir")
    p.add_argument("--dp", type=int, default=1)
    p.add_argument("--tp", type=int, default=None, help="default: world size / dp")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--activation-checkpointing", choices=["none", "full", "selective"], default="none")
    p.add_argument("--data", default=None, help=".npy or .bin (uint16) token ids; default synthetic")
    p.add_argument("--batch", type=int, default=2, help="sequences per dp rank per step")
    p.add_argument("--seq", type=int, default=32)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--stop-after", type=int, default=None, help="stop at this step (as if preempted)")
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--min-lr-ratio", type=float, default=0.1)
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--eps", type=float, default=1e-8)
    p.add_argument("--max-grad-norm", type=float, default=1.0)
    p.add_argument("--ckpt-dir", default=None)
    p.add_argument("--ckpt-every", type=int, default=0)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=1)
    p.add_argument("--quiet", action="store_true", help="no progress output (tests)")
    return p.parse_args(argv)


def build_model(path: str, dtype: torch.dtype, seed: int):
    """(model, checkpoint dir or None).  A config json gives random weights (seeded: equal on
    every rank); a checkpoint dir gives a model on the meta device, loaded after parallelize."""
    from transformers import AutoConfig, AutoModelForCausalLM
    path = Path(path)
    config = AutoConfig.from_pretrained(path) if path.is_dir() else AutoConfig.for_model(**json.loads(path.read_text()))
    if path.is_dir():
        with torch.device("meta"):                        # no memory; rotary buffers recomputed by autotp
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        return model, path
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config).to(dtype), None


def make_mesh(dp: int, tp: int | None):
    world = dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", 1))
    tp = tp or world // dp
    if dp * tp != world:
        raise SystemExit(f"--dp {dp} x --tp {tp} != world size {world}")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    return init_device_mesh(device, (dp, tp), mesh_dim_names=("dp", "tp"))


def shard_model(model, mesh, example_ids, checkpoint_dir=None, activation_checkpointing=None, mp_policy=None):
    """autotp over "tp" (logits left vocab-split), the checkpoint's slices, then FSDP2 over "dp":
    one unit per decoder layer and the root (embedding, final norm, head).  With ``mp_policy``
    the plan is made in the policy's ``param_dtype``, the dtype FSDP2 feeds the forward."""
    pmodel = autotp.parallelize(model, (example_ids,), mesh=mesh, sharded_outputs=True,
                                activation_checkpointing=activation_checkpointing,
                                param_dtype=None if mp_policy is None else mp_policy.param_dtype)
    if checkpoint_dir is not None:
        autotp.load_checkpoint(pmodel, checkpoint_dir, allow_dtype_cast=True)
    if mesh["dp"].size() > 1:
        kw = {} if mp_policy is None else {"mp_policy": mp_policy}
        for layer in pmodel.blocks():
            fully_shard(layer, mesh=mesh["dp"], **kw)
        fully_shard(pmodel, mesh=mesh["dp"], **kw)
    return pmodel


def mixed_precision(param_dtype: torch.dtype):
    """FSDP2 casts each unit's gathered weights to ``param_dtype`` and reduce-scatters in fp32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy
    return MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)


def load_tokens(data: str | None, vocab_size: int, seed: int, synthetic_tokens: int = 1 << 14) -> torch.Tensor:
    """The corpus as a 1-D int64 tensor: a file of token ids, or seeded random tokens drawn from a
    random bigram chain (each token is followed by one of 4 fixed tokens), so there is something
    to learn: the loss can fall from ln(vocab) towards ln(4)."""
    if data is None:
        g = torch.Generator().manual_seed(seed)
        successors = torch.randint(0, vocab_size, (vocab_size, 4), generator=g)      # (vocab, 4)
        pick = torch.randint(0, 4, (synthetic_tokens,), generator=g).tolist()
        ids = [0]
        for k in pick[1:]:
            ids.append(successors[ids[-1], k].item())
        return torch.tensor(ids)
    ids = np.load(data, mmap_mode="r") if data.endswith(".npy") else np.memmap(data, dtype=np.uint16, mode="r")
    return torch.from_numpy(np.asarray(ids, dtype=np.int64))


def global_batch(tokens: torch.Tensor, step: int, rows: int, seq: int, seed: int) -> torch.Tensor:
    """Step ``step``'s (rows, seq + 1) windows of the corpus, the same on every rank and in every run."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    starts = torch.randint(0, len(tokens) - seq - 1, (rows,), generator=g)
    return torch.stack([tokens[s:s + seq + 1] for s in starts.tolist()])     # (rows, seq + 1)


def lr_at(step: int, args) -> float:
    """Linear warmup over ``--warmup`` steps, then cosine decay to ``min_lr_ratio * lr`` at ``--steps``."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def make_optimizer(params, args) -> torch.optim.AdamW:
    return torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.95), eps=args.eps, weight_decay=args.weight_decay)


def save_checkpoint(ckpt_dir: str, step: int, pmodel, optimizer) -> None:
    """DCP: every rank writes its shards of the model and optimizer state; ``latest`` names the step."""
    model_sd, optim_sd = get_state_dict(pmodel, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=os.path.join(ckpt_dir, f"step-{step}"))
    dist.barrier()
    if dist.get_rank() == 0:
        Path(ckpt_dir, "latest").write_text(str(step))


def resume_checkpoint(ckpt_dir: str, pmodel, optimizer) -> int:
    """Load the latest checkpoint into ``pmodel`` and ``optimizer``; returns the steps done (0: none)."""
    latest = Path(ckpt_dir, "latest")
    if not latest.exists():
        return 0
    step = int(latest.read_text())
    model_sd, optim_sd = get_state_dict(pmodel, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=os.path.join(ckpt_dir, f"step-{step}"))
    set_state_dict(pmodel, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    return step


def state_bytes(pmodel, optimizer) -> int:
    """This rank's parameter, gradient and optimizer-state bytes (its shards)."""
    def local(t):
        return t.to_local() if hasattr(t, "to_local") else t
    total = sum(local(p).nbytes + (local(p.grad).nbytes if p.grad is not None else 0) for p in pmodel.parameters())
    for s in optimizer.state.values():
        total += sum(local(v).nbytes for v in s.values() if isinstance(v, torch.Tensor))
    return total


def memory_per_rank(pmodel, optimizer) -> list[int]:
    """Bytes per rank: the allocator's peak on CUDA, the training state's bytes on CPU (no allocator stats)."""
    mine = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else state_bytes(pmodel, optimizer)
    out = [0] * dist.get_world_size()
    dist.all_gather_object(out, mine)
    return out


def train_step(pmodel, optimizer, window, dp_group, args) -> float:
    """One step on this dp rank's (batch, seq + 1) windows; returns the loss over all dp ranks."""
    ids, labels = window[:, :-1], window[:, 1:]                    # (batch, seq) each
    logits = pmodel(ids).logits                                    # DTensor (batch, seq, vocab/tp)
    loss = autotp.cross_entropy(logits, labels)                    # exact, from the vocab slices
    loss.backward()                                                # FSDP2 averages gradients over dp
    autotp.clip_grad_norm_(pmodel.parameters(), args.max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    total = loss.detach().float().clone()
    dist.all_reduce(total, group=dp_group)                         # equal token counts: mean of means
    return total.item() / dist.get_world_size(dp_group)


def progress_bar(args, total: int, done: int):
    """A rich progress bar on rank 0 (None elsewhere or with --quiet); a plain log when not a terminal."""
    if args.quiet or dist.get_rank() != 0:
        return None
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    console = Console(soft_wrap=True)                  # the step lines never wrap
    bar = Progress(TextColumn("train"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   TextColumn("{task.fields[stats]}"), console=console, disable=not console.is_terminal)
    bar.add_task("train", total=total, completed=done, stats="")
    return bar


def train(args) -> dict[int, float]:
    """Run the recipe; returns {step: loss} for the steps this run made (1-based, as printed)."""
    mesh = make_mesh(args.dp, args.tp)
    dp_rank, dp = mesh["dp"].get_local_rank(), mesh["dp"].size()
    dtype, compute_dtype = DTYPES[args.dtype]
    model, checkpoint_dir = build_model(args.model, dtype, args.seed)
    tokens = load_tokens(args.data, model.config.vocab_size, args.seed)
    device = mesh.device_type
    example = global_batch(tokens, 0, args.batch, args.seq, args.seed)[:, :-1]
    mixed = compute_dtype != dtype
    if mixed and dp == 1:
        raise SystemExit("--dtype bf16-mixed needs FSDP2, --dp > 1; use --dtype bf16 on one dp rank")
    pmodel = shard_model(model, mesh, example.to(device), checkpoint_dir,
                         None if args.activation_checkpointing == "none" else args.activation_checkpointing,
                         mp_policy=mixed_precision(compute_dtype) if mixed else None)
    optimizer = make_optimizer(pmodel.parameters(), args)
    done = resume_checkpoint(args.ckpt_dir, pmodel, optimizer) if args.resume and args.ckpt_dir else 0
    last = min(args.steps, args.stop_after or args.steps)
    losses, bar = {}, progress_bar(args, args.steps, done)
    if bar is not None:
        bar.start()
        bar.console.print(f"world {dist.get_world_size()} = dp {dp} x tp {mesh['tp'].size()}, {args.dtype}, "
                          f"{sum(p.numel() for p in pmodel.parameters()):,} parameters, "
                          f"{dp * args.batch} x {args.seq} tokens per step" + (f", resumed at step {done}" if done else ""))
    for step in range(done, last):
        t0 = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, args)
        window = global_batch(tokens, step, dp * args.batch, args.seq, args.seed)[dp_rank * args.batch:][:args.batch]
        losses[step + 1] = train_step(pmodel, optimizer, window.to(device), mesh["dp"].get_group(), args)
        tokens_per_s = dp * args.batch * args.seq / (time.perf_counter() - t0)
        if args.ckpt_dir and args.ckpt_every and (step + 1) % args.ckpt_every == 0:
            save_checkpoint(args.ckpt_dir, step + 1, pmodel, optimizer)
        if not args.quiet and ((step + 1) % args.log_every == 0 or step + 1 == last):
            mem = memory_per_rank(pmodel, optimizer)
            if bar is not None:
                stats = (f"loss {losses[step + 1]:.4f}  lr {lr_at(step, args):.2e}  {tokens_per_s:,.0f} tok/s  "
                         f"{'peak' if torch.cuda.is_available() else 'state'} MiB/rank {' '.join(f'{m / 2**20:.2f}' for m in mem)}")
                bar.update(0, completed=step + 1, stats=stats)
                bar.console.print(f"step {step + 1:>4}  {stats}")
    if bar is not None:
        bar.stop()
    return losses


def main():
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    # clip_grad_norm_'s norm of (dp, tp) DTensor gradients: DTensor warns that it all-reduces over dp, then
    # over tp; each rank adds the same four partial norms, so every rank gets the same total
    logging.getLogger("torch.distributed.tensor._redistribute").setLevel(logging.ERROR)
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    args = parse_args()
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    try:
        train(args)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
