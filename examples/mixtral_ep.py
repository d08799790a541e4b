"""Expert-parallel Mixtral on CPU with autotp.

    python -m torch.distributed.run --nproc-per-node 4 examples/mixtral_ep.py [--sequence-parallel] [--experts 6]

An unmodified Hugging Face Mixtral (8 experts, top-2) from a small config: autotp puts E/N whole
experts on each rank from the grouped-matmul rule (no per-model code), keeps attention Megatron,
and the router replicated.  Prints the plan, the tokens each expert and rank received for the
batch, and the max error of logits and gradients against the same model on one device.

With ``--sequence-parallel`` the tokens are split by sequence: each rank routes its own tokens and
the routed rows travel to their experts' ranks and back by all-to-all (``moe_dispatch`` /
``moe_combine`` in the plan).

With ``--experts 6 --ffn 24`` on 4 ranks neither whole experts (6 % 4) nor a quarter of each
(6 columns: under the grouped matmul's 16-byte strides) divides: the plan splits the experts both
ways, 2 groups of 3 experts x 2 ranks per group (EP x TP, placement ``S(0)·S(2)@2``).
"""
import argparse
import copy
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM

import autotp


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sequence-parallel", action="store_true")
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--ffn", type=int, default=256, help="each expert's intermediate size")
    args = ap.parse_args()
    torch.manual_seed(0)
    cfg = AutoConfig.for_model("mixtral", vocab_size=512, hidden_size=128, intermediate_size=args.ffn,
                               num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=4,
                               num_local_experts=args.experts, num_experts_per_tok=2)
    model = AutoModelForCausalLM.from_config(cfg)
    reference = copy.deepcopy(model)
    ids = torch.randint(0, cfg.vocab_size, (2, 32))

    pmodel = autotp.parallelize(model, example_inputs=(ids,), sequence_parallel=args.sequence_parallel)
    logits = pmodel(ids).logits
    F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).backward()
    ref_logits = reference(ids).logits
    F.cross_entropy(ref_logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).backward()
    load = pmodel.expert_load(ids)                       # collectives: every rank calls these
    err = (logits - ref_logits).abs().max().item() / ref_logits.abs().max().item()
    ref = dict(reference.named_parameters())
    gerr = max((p.grad.full_tensor() - ref[n].grad).abs().max().item() / ref[n].grad.abs().max().item()
               for n, p in pmodel.named_parameters())

    if dist.get_rank() == 0:
        print("\n".join(line for line in pmodel.plan.summary().splitlines() if "layers.1." not in line))
        for layer in load:
            print(f"{layer['module']}: tokens per expert {layer['tokens_per_expert']}, "
                  f"{layer['expert_groups']} expert group(s), per rank "
                  f"{layer['tokens_per_rank']} (max/mean {layer['imbalance']:.2f})")
        print(f"max error vs one device: logits {err:.2e}, gradients {gerr:.2e}")
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
