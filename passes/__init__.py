"""autotp's graph passes, in pipeline order.

    capture (autotp.capture) -> propagate_placements -> solve -> insert_collectives -> localize
        -> lower_attention

Each pass is ``pass(gm, ctx) -> gm`` over the ATen graph that ``torch.export`` gave;
analysis passes write their facts to ``node.meta["autotp"]`` (``strategies``, ``strategy``,
``placement``), transform passes rewrite the graph and end with ``lint()``/``recompile()``.
"""
from autotp.passes.context import AutoTPError, PassContext
from autotp.passes.propagate import propagate_placements
from autotp.passes.solve import solve
from autotp.passes.collectives import insert_collectives
from autotp.passes.localize import localize
from autotp.passes.lower_attention import lower_attention

PLAN_PASSES = [propagate_placements, solve]
REWRITE_PASSES = [insert_collectives, localize, lower_attention]

__all__ = ["AutoTPError", "PassContext", "propagate_placements", "solve", "insert_collectives", "localize",
           "PLAN_PASSES", "REWRITE_PASSES"]
