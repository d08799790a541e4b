"""The pass dump: every stage as text and SVG, in order; repeated decoder layers fold into one box."""
import re
import shutil
import time

import pytest
import torch

import autotp
from autotp import viz
from autotp.__main__ import plan_from_config
from models import GPT2, build

STAGES = ["00_captured", "01_placements", "02_collectives", "03_localized", "04_modules"]
needs_dot = pytest.mark.skipif(shutil.which("dot") is None, reason="graphviz `dot` binary not installed")


@pytest.fixture(scope="module")
def llama_plan():
    torch.manual_seed(0)
    return autotp.plan(build("llama"), (torch.randint(0, 128, (2, 8)),), world_size=2)


def test_text_of_every_stage_in_pass_order(llama_plan, tmp_path, monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)          # no dot: .dot files and a warning
    with pytest.warns(UserWarning, match="dot"):
        files = viz.dump(llama_plan, tmp_path, fold=False)
    assert [f.name for f in files] == [f"{s}{ext}" for s in STAGES for ext in (".txt", ".dot")]
    text = {s: (tmp_path / f"{s}.txt").read_text() for s in STAGES}
    assert " S(0) " not in text["00_captured"] and "all_reduce" not in text["00_captured"]
    assert "column-parallel" in text["01_placements"] and "row-parallel" in text["01_placements"]
    assert "all_reduce" not in text["01_placements"]
    # Megatron: 2 forward all-reduces per layer (o_proj, down_proj), symbolic bytes of (batch, seq, 64) fp32
    assert len(re.findall(r"all_reduce\(.*forward all_reduce.*256\*batch\*seq bytes", text["02_collectives"])) == 4
    assert "local shapes" in text["03_localized"]
    assert "q_proj.weight S(0) [32, 64]" in text["03_localized"]    # 64 rows / 2 ranks
    assert "model.layers.1.self_attn.q_proj" in text["02_collectives"]              # not folded
    assert "row-parallel S(1)" in text["04_modules"] and "-> all_reduce (fwd all_reduce" in text["04_modules"]


@needs_dot
def test_svg_colours_placements_and_highlights_collectives(llama_plan, tmp_path):
    files = viz.dump(llama_plan, tmp_path)
    svgs = [f for f in files if f.suffix == ".svg"]
    assert [f.stem for f in svgs] == STAGES
    svg = (tmp_path / "02_collectives.svg").read_text()
    assert svg.lstrip().startswith("<?xml") and "</svg>" in svg
    assert "all_reduce" in svg and 'stroke="red"' in svg and "256*batch*seq B" in svg
    for colour in (viz.COLOURS["R"], viz.COLOURS["P"], viz.COLOURS["S(0)"], viz.COLOURS["S(1)"]):
        assert colour in svg                                        # the legend at least
    assert "x 1 identical layers" in svg                             # layer 1 folded into layer 0's box
    assert "column" in (tmp_path / "01_placements.svg").read_text()


def test_dump_from_env(llama_plan, tmp_path, monkeypatch):
    monkeypatch.delenv("AUTOTP_DUMP", raising=False)
    assert viz.dump_from_env(llama_plan) == []
    monkeypatch.setenv("AUTOTP_DUMP", str(tmp_path / "dump"))
    files = viz.dump_from_env(llama_plan)
    assert files and all(f.parent == tmp_path / "dump" for f in files)


def test_eighty_layers_fold_into_one_box_and_render_fast(tmp_path):
    """GPT-2 shape, 80 layers, on the meta device (GPT-2 plans 3x faster than Llama at 80 layers:
    ~20 s here; the dump itself, SVG included, is what must take seconds).  Layers with the same
    ops and placements fold into one box per group; a layer the solver places differently (today
    GPT-2's layer 0 attention stays replicated at 80 layers) is drawn as its own group."""
    from transformers import AutoConfig
    plan = plan_from_config(AutoConfig.for_model(**{**GPT2, "n_layer": 80}), 2)
    start = time.perf_counter()
    files = viz.dump(plan, tmp_path)
    seconds = time.perf_counter() - start
    assert seconds < 30, f"80-layer folded dump took {seconds:.1f}s"
    for stage in STAGES:
        dot = (tmp_path / f"{stage}.dot").read_text()
        folded = [int(n) for n in re.findall(r"x (\d+) identical layers", dot)]
        assert folded and sum(folded) >= 78, (stage, folded)       # at most 2 layers drawn
        assert dot.count("cluster_layer_") <= 2 or stage == "04_modules"
    text = (tmp_path / "02_collectives.txt").read_text()
    assert re.search(r"# \.\.\. layers (1|2)-79 \((79|78) layers\): identical to layer (0|1)", text)
    assert "transformer.h.5." not in text and "transformer.h.0." in text
    if shutil.which("dot"):
        assert [f.stem for f in files if f.suffix == ".svg"] == STAGES
        assert re.search(r"x (79|78) identical layers", (tmp_path / "02_collectives.svg").read_text())
