"""``python -m autotp plan|dump|verify`` on the tiny example configs, as a user runs them."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from autotp.__main__ import main

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "examples" / "configs"


def autotp_cli(*args, timeout=120):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "autotp", *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=timeout)


def test_plan_prints_the_report():
    r = autotp_cli("plan", CONFIGS / "llama-tiny.json", "--tp", 2, "--batch", 4, "--seq", 2048, "--dtype", "bf16",
                   "--link", "ib-hdr")
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "autotp cost report: TP 2, batch 4, seq 2048, bfloat16, link ib-hdr" in out
    assert "all_reduce" in out and "128*batch*seq" in out          # (batch, seq, 64) x 2 bytes
    assert "Where tensor parallelism stops paying off" in out and "Memory per rank" in out


def test_plan_with_sequence_parallelism(capsys):
    """--sequence-parallel: per layer the all-reduces become reduce-scatter + all-gather (same wire
    bytes), and the report's activation estimate drops."""
    args = ["plan", str(CONFIGS / "llama-tiny.json"), "--tp", "2", "--format", "json"]
    assert main(args) == 0
    tp = json.loads(capsys.readouterr().out)
    assert main(args + ["--sequence-parallel"]) == 0
    sp = json.loads(capsys.readouterr().out)
    layer = lambda d: d["totals"]["per_layer"][sorted(d["totals"]["per_layer"])[0]]["forward"]   # noqa: E731
    assert layer(tp)["by_kind"] == {"all_reduce": 2}
    assert layer(sp)["by_kind"] == {"all_gather": 2, "reduce_scatter": 2}
    assert layer(sp)["wire_bytes"] == pytest.approx(layer(tp)["wire_bytes"])
    assert sp["activations"]["sequence_parallel"] and sp["activations"]["bytes"] < tp["activations"]["bytes"]


@pytest.mark.parametrize("config, fmt", [("gpt2-tiny", "json"), ("mistral-tiny", "markdown")])
def test_plan_formats(config, fmt, capsys):
    assert main(["plan", str(CONFIGS / f"{config}.json"), "--tp", "2", "--format", fmt]) == 0
    out = capsys.readouterr().out
    if fmt == "json":
        data = json.loads(out)
        assert data["config"]["world"] == 2 and data["totals"]["decoder_forward"]["by_kind"]["all_reduce"] == 4
    else:
        assert out.startswith("# autotp cost report") and "| comm |" in out


def test_dump_writes_every_stage(tmp_path):
    r = autotp_cli("dump", CONFIGS / "gpt2-tiny.json", "--tp", 2, "-o", tmp_path)
    assert r.returncode == 0, r.stderr
    for stage in ("00_captured", "01_placements", "02_collectives", "03_localized", "04_modules"):
        assert (tmp_path / f"{stage}.txt").exists() and (tmp_path / f"{stage}.dot").exists()
        assert str(tmp_path / f"{stage}.txt") in r.stdout


def test_verify_two_ranks_matches_one_device():
    r = autotp_cli("verify", CONFIGS / "llama-tiny.json", "--nproc", 2, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "PASS" in r.stdout
    ranks = [line.split() for line in r.stdout.splitlines() if line.strip()[:1].isdigit()]
    assert len(ranks) == 2 and all(float(x) <= 1e-5 for row in ranks for x in row[1:4])


def test_plan_decode_step(capsys):
    """--decode: what a decode step of generate moves per rank, from the config alone (meta device):
    2 all-reduces per layer + the embedding's all-gather and the token exchange, bytes for greedy,
    top-k and a gathered row, and the KV cache split by kv heads."""
    path = CONFIGS / "llama-tiny.json"
    cfg = json.loads(path.read_text())
    batch, length, tp = 4, 64, 2
    assert main(["plan", str(path), "--tp", str(tp), "--batch", str(batch), "--seq", str(length), "--dtype", "bf16",
                 "--inference", "--decode", "--top-k", "5"]) == 0
    out = capsys.readouterr().out
    decode = out[out.index("Decode step (generate)"):]
    layers, hidden, vocab = cfg["num_hidden_layers"], cfg["hidden_size"], cfg["vocab_size"]
    assert f"{{'all_gather': 2, 'all_reduce': {2 * layers}}}" in decode, decode
    # every collective but the exchange moves (batch, 1, hidden) bf16 values; the exchange tp x batch
    # x k (value, index) pairs of float64, or the (batch, vocab) bf16 row
    rest = (2 * layers + 1) * batch * hidden * 2
    assert f"greedy {rest + tp * batch * 16:,}; top-k 5 sampling {rest + tp * batch * 5 * 16:,}" in decode, decode
    assert f"gathered) {rest + batch * vocab * 2:,}" in decode, decode
    kv = cfg.get("num_key_value_heads", cfg["num_attention_heads"])
    full = layers * 2 * batch * length * kv * (hidden // cfg["num_attention_heads"]) * 2
    assert f"logits S(2) of vocab {vocab}; KV cache per rank {full // tp:,} B" in decode and f"of {full:,} B" in decode
