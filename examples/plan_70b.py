"""Plan Llama-70B for 8-way tensor parallelism on the meta device and print the cost report.

    python examples/plan_70b.py                 # all 80 layers (1-3 minutes on a 2-core CPU)
    python examples/plan_70b.py --layers 4      # 4 layers: same per-layer numbers, seconds
    python examples/plan_70b.py --link ib-hdr --format markdown

No weights are allocated: the model lives on the meta device, so the 70B shape plans on any
machine.  The report ends with the article check (both the 1x volume and the ring factor).
"""
import argparse
import time
from pathlib import Path

import torch

from autotp.__main__ import load_config, plan_from_config
from autotp.report import article_check
from autotp.report_text import report

CONFIG = Path(__file__).parent / "configs" / "llama-70b.json"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=None, help="plan only this many of the 80 decoder layers")
    ap.add_argument("--tp", type=int, default=8)
    ap.add_argument("--link", default="nvlink-h100")
    ap.add_argument("--format", default="text", choices=["text", "markdown", "json"])
    args = ap.parse_args()

    full_layers = load_config(str(CONFIG))[0].num_hidden_layers               # 80
    cfg, _ = load_config(str(CONFIG), args.layers)
    start = time.perf_counter()
    plan = plan_from_config(cfg, args.tp)
    print(f"planned {cfg.num_hidden_layers} of {full_layers} layers at TP {args.tp} in "
          f"{time.perf_counter() - start:.1f}s\n")
    print(report(plan, batch=4, seq=2048, dtype=torch.bfloat16, link=args.link, fmt=args.format,
                 full_layers=full_layers))
    if args.format == "json":
        return
    # The report's last section is the article check; article_check() is the same text on its own:
    assert article_check(plan, layers=full_layers).splitlines()[0].startswith("Article check")


if __name__ == "__main__":
    main()
