"""A model that loops over the sequence in Python is traced unrolled: the plan must refuse other
sequence lengths with a clear error instead of silently running a truncated loop."""
import torch

from autotp.capture import capture


class _Scan(torch.nn.Module):
    """A running sum written as a Python loop over positions (like a selective scan)."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(16, 8)
        self.out = torch.nn.Linear(8, 16, bias=False)

    def forward(self, ids):
        h = self.embed(ids)                           # (B, T, 8)
        state = torch.zeros_like(h[:, 0])
        outs = []
        for t in range(h.shape[1]):
            state = state + h[:, t]
            outs.append(state)
        return self.out(torch.stack(outs, dim=1)[:, -1])


def test_loop_over_sequence_pins_its_length():
    ids = torch.randint(0, 16, (2, 5))
    cap = capture(_Scan(), (ids,))
    pinned = {str(cap.symbols.get(s, s)): v[0] for s, v in cap.pinned.items()}
    sizes = [n.meta["val"].shape for n in cap.gm.graph.nodes if n.op == "placeholder" and n.name == "ids"][0]
    # either export fixed the length itself, or autotp pinned it: never a symbolic length with an unrolled loop
    from autotp.program import static_size as _static
    assert _static(sizes[1]) == 5 or pinned.get("seq") == 5, (sizes, pinned)


def test_last_position_select_is_generic():
    class Last(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(8, 8)

        def forward(self, x):
            return self.lin(x[:, -1]) + self.lin(x[:, 0])

    cap = capture(Last(), (torch.randn(2, 6, 8),))
    assert not cap.pinned


class _ChunkScan(torch.nn.Module):
    """A scan over a sequence padded up to whole chunks (Qwen3-Next's chunked delta rule): the
    loop runs over the padded length, a size that is not the input's."""

    def __init__(self, chunk=8):
        super().__init__()
        self.chunk = chunk
        self.embed = torch.nn.Embedding(16, 4)

    def forward(self, ids):
        h = self.embed(ids)                                           # (B, T, 4)
        pad = (self.chunk - h.shape[1] % self.chunk) % self.chunk
        h = torch.nn.functional.pad(h, (0, 0, 0, pad))                 # (B, T + pad, 4)
        state = torch.zeros_like(h[:, 0])
        for t in range(h.shape[1]):
            state = state + h[:, t]
        return state


def test_loop_over_a_padded_length_pins_the_inputs_own_length():
    """The pinned value is the input's sequence length (5), not the padded length (8): the
    example's own shape runs, and any other length gets the clear error."""
    ids = torch.randint(0, 16, (2, 5))
    cap = capture(_ChunkScan(), (ids,))
    from autotp.program import static_size as _static
    sizes = [n.meta["val"].shape for n in cap.gm.graph.nodes if n.op == "placeholder" and n.name == "ids"][0]
    pinned = {str(cap.symbols.get(s, s)): v[0] for s, v in cap.pinned.items()}
    assert _static(sizes[1]) == 5 or pinned.get("seq") == 5, (sizes, pinned)
