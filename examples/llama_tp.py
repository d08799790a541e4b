"""Tensor-parallel Llama on CPU with autotp — the `make demo` script.

    python -m torch.distributed.run --nproc-per-node 4 examples/llama_tp.py [--sequence-parallel]

Builds an unmodified Hugging Face Llama from a small config (random weights, same seed on
every rank), parallelises it with no hints, runs forward + backward, and prints the chosen
plan per weight, the collectives per layer and the max error against the same model run on
one device.  ``--sequence-parallel`` plans Megatron-SP instead (norms and residual adds split
along the sequence; each all-reduce becomes a reduce-scatter + all-gather).
"""
import copy
import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, LlamaConfig

import autotp


def main():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=344, num_hidden_layers=2,
                      num_attention_heads=8, num_key_value_heads=4)
    model = AutoModelForCausalLM.from_config(cfg)
    reference = copy.deepcopy(model)                          # the one-device run to compare with
    ids = torch.randint(0, cfg.vocab_size, (2, 16))

    sp = "--sequence-parallel" in sys.argv[1:]
    pmodel = autotp.parallelize(model, example_inputs=(ids,), sequence_parallel=sp)  # gloo from torchrun's env
    rank, world = dist.get_rank(), dist.get_world_size()

    logits = pmodel(ids).logits
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    loss.backward()

    ref_logits = reference(ids).logits
    F.cross_entropy(ref_logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).backward()
    logit_err = (logits - ref_logits).abs().max().item() / ref_logits.abs().max().item()
    ref_grads = dict(reference.named_parameters())
    grad_err = max((p.grad.full_tensor() - ref_grads[n].grad).abs().max().item()
                   / ref_grads[n].grad.abs().max().item() for n, p in pmodel.named_parameters())

    if rank == 0:
        print(pmodel.plan.summary())
        local = sum(p.to_local().numel() for p in pmodel.parameters())
        full = sum(p.numel() for p in pmodel.parameters())
        print(f"\nworld size {world}: rank 0 holds {local:,} of {full:,} parameter elements "
              f"({local / full:.1%})")
        print(f"max error vs one device (relative to scale): logits {logit_err:.2e}, gradients {grad_err:.2e}")
        ok = logit_err <= 1e-5 and grad_err <= 1e-5
        print("equivalent: " + ("yes" if ok else "NO"))
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
