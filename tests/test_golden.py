"""Golden graphs: the rewritten graph of a small model as readable text, checked in.

Refresh after an intended change with ``pytest tests/test_golden.py --update-goldens`` and
review the diff like code.
"""
import pathlib

import pytest
import torch

import autotp
from models import build

GOLDENS = pathlib.Path(__file__).parent / "goldens"


def _check(name: str, text: str, update: bool) -> None:
    path = GOLDENS / f"{name}.txt"
    if update or not path.exists():
        path.write_text(text)
        if not update:
            pytest.fail(f"golden {path.name} did not exist; written — review and commit it")
    assert text == path.read_text(), (f"rewritten graph differs from {path}; if intended, rerun with "
                                      f"--update-goldens and review the diff")


@pytest.mark.parametrize("family,world", [("llama", 2), ("gpt2", 2)])
def test_golden_graph(family, world, update_goldens):
    torch.manual_seed(0)
    model = build(family, **({"num_hidden_layers": 1} if family == "llama" else {"n_layer": 1}))
    ids = torch.randint(0, 96, (2, 8))
    plan = autotp.plan(model, (ids,), world_size=world)
    _check(f"{family}_1layer_n{world}", plan.summary() + "\n\n" + plan.graph_text(), update_goldens)


def test_golden_mixtral(update_goldens):
    """One Mixtral layer at N=2: expert parallelism, the disjoint partial sum D, one combine."""
    from models import build_any
    torch.manual_seed(0)
    model = build_any("mixtral", num_hidden_layers=1)
    ids = torch.randint(0, 96, (2, 8))
    plan = autotp.plan(model, (ids,), world_size=2)
    _check("mixtral_1layer_n2", plan.summary() + "\n\n" + plan.graph_text(), update_goldens)


def test_golden_mixtral_all_to_all(update_goldens):
    """One Mixtral layer at N=2, sequence parallel: the block routed on each rank's tokens
    (``L``), rows dispatched to their experts' ranks and combined back by all-to-all (``X``)."""
    from models import build_any
    torch.manual_seed(0)
    model = build_any("mixtral", num_hidden_layers=1)
    ids = torch.randint(0, 96, (2, 8))
    plan = autotp.plan(model, (ids,), world_size=2, sequence_parallel=True)
    _check("mixtral_1layer_n2_a2a", plan.summary() + "\n\n" + plan.graph_text(), update_goldens)
