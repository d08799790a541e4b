"""Real sizes: meta-device start + per-rank sliced safetensors loading, full and DCP state dicts."""
import datetime
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from models import FAMILIES

TOL = 1e-5


def _config(name):
    from transformers import AutoConfig
    return AutoConfig.for_model(**FAMILIES[name])


def _build(name, seed=0):
    from transformers import AutoModelForCausalLM
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(_config(name))


def _init(rank, world, tmp):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(os.path.join(tmp, "store"), world), rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=60))


def _load_worker(rank, world, tmp, family, result_dir):
    import autotp
    from transformers import AutoModelForCausalLM
    _init(rank, world, tmp)
    ref = _build(family)
    ids = torch.randint(0, 90, (2, 8), generator=torch.Generator().manual_seed(1))
    with autotp.init_empty_weights():
        model = AutoModelForCausalLM.from_config(_config(family))
    assert all(p.device.type == "meta" for p in model.parameters())
    pmodel = autotp.parallelize(model, (ids,))
    report = autotp.load_checkpoint(pmodel, os.path.join(tmp, "ckpt"))
    out = pmodel(ids).logits
    want = ref(ids).logits
    err = ((out - want).abs().max() / want.abs().max()).item()
    full_bytes = sum(p.numel() * p.element_size() for p in ref.parameters())
    # the full state dict loads back into the plain Hugging Face model and gives the same logits
    full = autotp.full_state_dict(pmodel)
    plain = AutoModelForCausalLM.from_config(_config(family))
    plain.load_state_dict(full)
    err_full = ((plain(ids).logits - want).abs().max() / want.abs().max()).item()
    # built the torchtitan way: everything on meta, rotary tables included; the model's own init
    # code computes them on the run device, and the first forward and generate match one device
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(_config(family))
    pmodel = autotp.parallelize(model, (ids,))
    autotp.load_checkpoint(pmodel, os.path.join(tmp, "ckpt"))
    on_meta = [n for n, b in pmodel.named_buffers() if b.is_meta]
    err_meta = ((pmodel(ids).logits - want).abs().max() / want.abs().max()).item()
    same_tokens = bool((pmodel.generate(ids, max_new_tokens=3) ==
                        ref.generate(ids, max_new_tokens=3, do_sample=False)).all())
    torch.save({"err": err, "err_full": err_full, "read": report.bytes_read, "full_bytes": full_bytes,
                "names": list(dict(pmodel.named_parameters())), "on_meta": on_meta, "err_meta": err_meta,
                "same_tokens": same_tokens}, os.path.join(result_dir, f"{rank}.pt"))
    dist.destroy_process_group()


@pytest.mark.parametrize("family,world", [("qwen2", 4), ("gpt2", 2)])   # tied; strided c_attn
def test_meta_start_and_sliced_load(family, world):
    with tempfile.TemporaryDirectory() as tmp:
        _build(family).save_pretrained(os.path.join(tmp, "ckpt"), max_shard_size="100KB")   # several shards
        assert os.path.exists(os.path.join(tmp, "ckpt", "model.safetensors.index.json"))
        mp.start_processes(_load_worker, args=(world, tmp, family, tmp), nprocs=world, start_method="fork")
        for r in range(world):
            res = torch.load(os.path.join(tmp, f"{r}.pt"))
            assert res["err"] <= TOL and res["err_full"] <= TOL, res
            assert res["on_meta"] == [] and res["err_meta"] <= TOL and res["same_tokens"], res
            # each rank read about its shard, not the model (replicated norms and biases on top)
            assert res["read"] < 0.75 * res["full_bytes"], (res["read"], res["full_bytes"])


def _dcp_worker(rank, world, tmp, save):
    import torch.distributed.checkpoint as dcp
    import autotp
    _init(rank, world, tmp + ("save" if save else "load"))
    ids = torch.randint(0, 90, (2, 8), generator=torch.Generator().manual_seed(1))
    if save:
        pmodel = autotp.parallelize(_build("llama", seed=0), (ids,))
        dcp.save(pmodel.state_dict(), checkpoint_id=os.path.join(tmp, "dcp"))
    else:
        pmodel = autotp.parallelize(_build("llama", seed=123), (ids,))       # other weights, then load
        state = pmodel.state_dict()
        dcp.load(state, checkpoint_id=os.path.join(tmp, "dcp"))
        want = _build("llama", seed=0)(ids).logits
        err = ((pmodel(ids).logits - want).abs().max() / want.abs().max()).item()
        torch.save(err, os.path.join(tmp, f"dcp{rank}.pt"))
    dist.destroy_process_group()


def test_dcp_save_at_two_ranks_load_at_four():
    with tempfile.TemporaryDirectory() as tmp:
        os.makedirs(tmp + "save", exist_ok=True)
        os.makedirs(tmp + "load", exist_ok=True)
        mp.start_processes(_dcp_worker, args=(2, tmp, True), nprocs=2, start_method="fork")
        mp.start_processes(_dcp_worker, args=(4, tmp, False), nprocs=4, start_method="fork")
        for r in range(4):
            assert torch.load(os.path.join(tmp, f"dcp{r}.pt")) <= TOL


def test_bad_checkpoint_is_refused_whole(tmp_path):
    """Wrong shapes, missing tensors, a corrupt file: one error listing the problems, nothing loaded."""
    import autotp
    from safetensors.torch import save_file
    if not dist.is_initialized():
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        ref = _build("llama")
        ids = torch.randint(0, 90, (2, 8))
        pmodel = autotp.parallelize(_build("llama", seed=5), (ids,))
        before = {n: p.full_tensor().clone() for n, p in pmodel.named_parameters()}
        state = {n: t.contiguous() for n, t in ref.state_dict().items()}
        state["model.norm.weight"] = torch.ones(3)
        del state["model.layers.0.mlp.up_proj.weight"]
        save_file(state, str(tmp_path / "model.safetensors"))
        with pytest.raises(autotp.AutoTPError) as err:
            autotp.load_checkpoint(pmodel, tmp_path)
        msg = str(err.value)
        assert "model.norm.weight is [3]" in msg and "missing: model.layers.0.mlp.up_proj.weight" in msg
        assert "nothing was loaded" in msg
        after = {n: p.full_tensor() for n, p in pmodel.named_parameters()}
        assert all(torch.equal(before[n], after[n]) for n in before)
        (tmp_path / "model.safetensors").write_bytes((tmp_path / "model.safetensors").read_bytes()[:100])
        with pytest.raises(autotp.AutoTPError, match="truncated or corrupt"):
            autotp.load_checkpoint(pmodel, tmp_path / "model.safetensors")
        (tmp_path / "weights.bin").write_bytes(b"not a pickle for you")
        with pytest.raises(autotp.AutoTPError, match="safetensors checkpoints only"):
            autotp.load_checkpoint(pmodel, tmp_path / "weights.bin")
    finally:
        dist.destroy_process_group()


def _moe_worker(rank, world, tmp):
    import autotp
    from autotp.verify import HFModel
    from models import MOE_FAMILIES
    _init(rank, world, tmp)
    out = {}
    for family, cfg in MOE_FAMILIES.items():
        torch.manual_seed(0)
        ref = HFModel(cfg)()
        ids = torch.randint(0, 128, (2, 6), generator=torch.Generator().manual_seed(1))
        with autotp.init_empty_weights():                      # traced on meta, run on CPU
            model = HFModel(cfg)()
        pmodel = autotp.parallelize(model, (ids,))
        report = autotp.load_checkpoint(pmodel, os.path.join(tmp, family))
        want = ref(ids).logits
        out[family] = {"err": ((pmodel(ids).logits - want).abs().max() / want.abs().max()).item(),
                       "unused": report.unused, "read": report.bytes_read,
                       "full": sum(p.numel() * p.element_size() for p in ref.parameters()),
                       "experts": autotp.fmt(pmodel.plan.placements["model.layers.0.mlp.experts.down_proj"])}
    torch.save(out, os.path.join(tmp, f"moe{rank}.pt"))
    dist.destroy_process_group()


def test_moe_checkpoint_in_transformers_saved_layout():
    """transformers saves Mixtral's experts one by one (``block_sparse_moe.experts.{e}.w1/w2/w3``)
    and Qwen2-MoE's as ``experts.{e}.gate_proj/up_proj/down_proj``, and converts them to the
    stacked parameters when it loads.  ``load_checkpoint`` applies the same conversion (its own
    ``conversion_mapping``), reading only this rank's experts' tensors: exact logits, every
    tensor used by some rank.
    The models start on the meta device and run on CPU (their traced ``histc`` took the
    non-CPU integer branch; the runtime casts it)."""
    from autotp.verify import HFModel
    from models import MOE_FAMILIES
    with tempfile.TemporaryDirectory() as tmp:
        for family, cfg in MOE_FAMILIES.items():
            torch.manual_seed(0)
            HFModel(cfg)().save_pretrained(os.path.join(tmp, family))
        assert not any(".experts.gate_up_proj" in k for k in _keys(os.path.join(tmp, "mixtral")))
        mp.start_processes(_moe_worker, args=(2, tmp), nprocs=2, start_method="fork")
        for r in range(2):
            for family, res in torch.load(os.path.join(tmp, f"moe{r}.pt")).items():
                assert res["err"] <= TOL and not res["unused"] and res["experts"] == "S(0)", (family, res)
                # each rank read its own experts' tensors (and its slices of the rest), not the model
                assert res["read"] < 0.75 * res["full"], (family, res["read"], res["full"])


def _keys(ckpt_dir):
    from safetensors import safe_open
    with safe_open(os.path.join(ckpt_dir, "model.safetensors"), framework="pt") as f:
        return list(f.keys())


def test_meta_buffers_the_init_code_cannot_compute_are_refused():
    """A buffer the model's own init code does not write is an error naming it, never garbage."""
    import autotp
    from autotp.checkpoint import materialize_buffers

    class Table(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("table", torch.arange(4.0), persistent=False)

    with torch.device("meta"):
        model = torch.nn.Sequential(torch.nn.Linear(4, 4), Table())
    with pytest.raises(autotp.AutoTPError, match=r"\['1.table'\].*init_empty_weights"):
        materialize_buffers(model, torch.device("cpu"))
