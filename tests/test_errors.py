"""Bad input gets a clear error — op, node, source line, what to do — never a wrong answer."""
import datetime

import pytest
import torch
import torch.distributed as dist

import autotp
from autotp import AutoTPError
from models import build


@pytest.fixture(scope="module")
def one_rank():
    """A real one-process gloo group, so parallelize runs in this process."""
    if not dist.is_initialized():
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1,
                                timeout=datetime.timedelta(seconds=30))
    yield
    dist.destroy_process_group()


class _Cumprod(torch.nn.Module):
    """An op autotp has no rule for (logcumsumexp) on a sharded activation."""
    def __init__(self):
        super().__init__()
        self.up = torch.nn.Linear(16, 32, bias=False)
        self.down = torch.nn.Linear(32, 16, bias=False)

    def forward(self, x):
        return self.down(torch.logcumsumexp(self.up(x), dim=1))


def test_op_without_rule_strict_names_op_node_and_line():
    with pytest.raises(AutoTPError) as err:
        autotp.plan(_Cumprod(), (torch.randn(2, 4, 16),), world_size=2, strict=True)
    msg = str(err.value)
    assert "aten.logcumsumexp.default" in msg and "node `logcumsumexp`" in msg
    assert "test_errors.py" in msg and "torch.logcumsumexp" in msg      # the user's source line
    assert "register_rule" in msg                                      # and what to do


def test_op_without_rule_runs_replicated_and_says_so():
    plan = autotp.plan(_Cumprod(), (torch.randn(2, 4, 16),), world_size=2)
    assert any("logcumsumexp" in n and "replicated" in n for n in plan.notes)


class _DataDependent(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(8, 8)

    def forward(self, x):
        if x.sum() > 0:                       # Python branch on a tensor value: export cannot trace it
            return self.lin(x)
        return x


def test_model_export_rejects_gets_a_way_out():
    with pytest.raises(AutoTPError) as err:
        autotp.plan(_DataDependent(), (torch.randn(2, 8),), world_size=2)
    msg = str(err.value)
    assert "torch.export could not capture _DataDependent" in msg and "torch.cond" in msg


def test_data_dependent_size_names_node_line_and_way_out():
    """JetMoE's router sizes its expert batches with ``.tolist()``: export keeps a size no input
    shape gives.  The error names the op, the module, the model's source line and what to do."""
    from transformers import AutoConfig, AutoModelForCausalLM
    cfg = AutoConfig.for_model("jetmoe", vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                               num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                               num_experts_per_tok=2)
    with pytest.raises(AutoTPError) as err:
        autotp.plan(AutoModelForCausalLM.from_config(cfg), (torch.randint(0, 128, (2, 8)),), world_size=2)
    msg = str(err.value)
    assert "aten.item.default" in msg and "experts.router" in msg and "tolist()" in msg   # op, module, line
    assert "depends on tensor values" in msg and "What to do" in msg


def test_mesh_without_tp_dimension(one_rank):
    from torch.distributed.device_mesh import init_device_mesh
    mesh = init_device_mesh("cpu", (1, 1), mesh_dim_names=("dp", "pp"))
    with pytest.raises(AutoTPError, match="dimension named 'tp'"):
        autotp.parallelize(build("llama"), (torch.randint(0, 90, (2, 8)),), mesh=mesh)


def test_mesh_of_wrong_type(one_rank):
    with pytest.raises(AutoTPError, match="DeviceMesh"):
        autotp.parallelize(build("llama"), (torch.randint(0, 90, (2, 8)),), mesh=[0, 1])


def test_wrong_dtype_and_structure_at_run_time(one_rank):
    torch.manual_seed(0)
    pmodel = autotp.parallelize(build("llama"), (torch.randint(0, 90, (2, 8)),))
    with pytest.raises(AutoTPError, match="dtype torch.int32.*torch.int64"):
        pmodel(torch.randint(0, 90, (2, 8), dtype=torch.int32))
    with pytest.raises(AutoTPError, match="keyword argument"):
        pmodel(torch.randint(0, 90, (2, 8)), output_attentions=True)
    with pytest.raises(AutoTPError, match="structure"):
        pmodel(torch.randint(0, 90, (2, 8)), torch.ones(2, 8))


def test_unknown_override_pattern():
    with pytest.raises(AutoTPError, match="matches no parameter"):
        autotp.plan(build("llama"), (torch.randint(0, 90, (2, 8)),), world_size=2,
                    overrides={"*.no_such.weight": autotp.Replicate()})
