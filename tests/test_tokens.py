"""Token-local placement ``L`` (``passes/rules/tokens.py``) must never change a number.

Models whose code mixes tokens in ways that are *not* token-separable — sorting all tokens and
keeping that order, a running sum over tokens, a softmax over the tokens, normalising by a sum
over all tokens — planned with ``sequence_parallel=True`` must still match one device exactly:
their regions get no token-local exit, so the solver gathers there (or proves ``P``).
"""
import torch
import torch.nn as nn

from autotp.verify import Case, verify

V, D = 64, 32


class _Base(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(V, D)
        self.up = nn.Linear(D, 4 * D, bias=False)
        self.down = nn.Linear(4 * D, D, bias=False)
        self.head = nn.Linear(D, V, bias=False)

    def mlp(self, h):
        return h + self.down(torch.relu(self.up(h)))


class SortedTokens(_Base):
    """Tokens sorted by a score over the whole batch, kept in that order."""
    def forward(self, ids):
        h = self.mlp(self.emb(ids))
        b, s, d = h.shape
        flat = h.reshape(-1, d)
        order = flat.sum(-1).sort().indices
        return self.head(self.mlp(flat[order].reshape(b, s, d)))


class RunningSum(_Base):
    """A running sum over the flattened tokens."""
    def forward(self, ids):
        h = self.mlp(self.emb(ids))
        b, s, d = h.shape
        return self.head(self.mlp(h.reshape(-1, d).cumsum(0).reshape(b, s, d) / 8))


class TokenSoftmax(_Base):
    """Weights from a softmax over all tokens, and a mean over them added back."""
    def forward(self, ids):
        h = self.mlp(self.emb(ids))
        b, s, d = h.shape
        flat = h.reshape(-1, d)
        w = torch.softmax(flat.sum(-1), dim=0)
        flat = flat * w[:, None] + flat.mean(0)
        return self.head(self.mlp(flat.reshape(b, s, d)))


class SlotsRouted(_Base):
    """MoE-like routing done right (sort, gather, un-sort by the inverse permutation; no weights
    inside): the token-local region applies (``test_routed_region_is_token_local``), exact too."""
    def forward(self, ids):
        h = self.mlp(self.emb(ids))
        b, s, d = h.shape
        flat = h.reshape(-1, d)
        k = 2
        slots = torch.topk(flat[:, :4], k, dim=-1).indices.reshape(-1)
        experts, perm = slots.sort()
        rows = torch.tanh(flat[perm // k]) * (1 + experts[:, None])
        inv = torch.empty_like(perm)
        inv[perm] = torch.arange(perm.shape[0])
        out = rows[inv].view(-1, k, d).sum(1)
        return self.head(self.mlp(h + out.reshape(b, s, d)))


def test_token_mixing_stays_exact_under_sequence_parallelism():
    cases = [Case(m.__name__, m, vocab=V, kwargs={"sequence_parallel": True}, other_shapes=((3, 4),))
             for m in (SortedTokens, RunningSum, TokenSoftmax, SlotsRouted)]
    for rank in verify(cases, 2):
        for r in rank:
            assert not r.error, f"{r.name}:\n{r.error}"
            assert r.logits_err <= 1e-5 and r.grad_err <= 1e-5 and r.other_shape_err <= 1e-5, \
                (r.name, r.logits_err, r.grad_err, r.worst_grad, r.other_shape_err)


def test_routed_region_is_token_local():
    """The routing of ``SlotsRouted`` runs on each rank's tokens (placement L); the others have
    no token-local exit: nothing of theirs comes back from L."""
    import autotp
    from autotp.placement import TokenLocal
    for model, routed in ((SlotsRouted, True), (SortedTokens, False), (RunningSum, False), (TokenSoftmax, False)):
        torch.manual_seed(0)
        plan = autotp.plan(model(), (torch.randint(0, V, (2, 8)),), world_size=2, sequence_parallel=True)
        local = [n for n in plan.gm.graph.nodes if isinstance(n.meta.get("autotp", {}).get("placement"), TokenLocal)]
        if routed:
            kinds = {n.meta["autotp"]["placement"].kind for n in local}
            assert kinds == {"o", "s", "sp", "op", "ip"}, kinds
        else:
            assert not local, [n.name for n in local]
