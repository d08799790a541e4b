"""autotp's graph passes, in pipeline order.

    capture (autotp.capture) -> propagate_placements -> solve -> insert_collectives
        -> fuse_gather_grad_reduce -> hoist_gathers -> bucket_grad_reduces -> localize -> lower_attention

Each pass is ``pass(gm, ctx) -> gm`` over the ATen graph that ``torch.export`` gave;
analysis passes write their facts to ``node.meta["autotp"]`` (``strategies``, ``strategy``,
``placement``), transform passes rewrite the graph and end with ``lint()``/``recompile()``.
"""
from autotp.passes.context import AutoTPError, PassContext
from autotp.passes.propagate import propagate_placements
from autotp.passes.solve import solve
from autotp.passes.collectives import bucket_grad_reduces, fuse_gather_grad_reduce, hoist_gathers, insert_collectives
from autotp.passes.localize import localize
from autotp.passes.lower_attention import lower_attention

PLAN_PASSES = [propagate_placements, solve]
COLLECTIVE_PASSES = [insert_collectives, fuse_gather_grad_reduce, hoist_gathers, bucket_grad_reduces]
REWRITE_PASSES = [*COLLECTIVE_PASSES, localize, lower_attention]

__all__ = ["AutoTPError", "PassContext", "propagate_placements", "solve", "insert_collectives", "localize",
           "fuse_gather_grad_reduce", "hoist_gathers", "bucket_grad_reduces", "PLAN_PASSES", "COLLECTIVE_PASSES",
           "REWRITE_PASSES", "run_passes"]


def run_passes(passes, gm, ctx, snapshots: list | None = None):
    """Run ``passes`` in order; with ``snapshots`` (a list), append (pass name, a copy of the graph
    after it) for each — what the dumps and ``viz`` draw, instead of re-running passes by hand."""
    from autotp.program import copy_graph_module
    for p in passes:
        gm = p(gm, ctx)
        if snapshots is not None:
            snapshots.append((p.__name__, copy_graph_module(gm)))
    return gm
