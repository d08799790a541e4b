"""Measured memory: the bytes of tensor storages a piece of code allocates and keeps alive.

``LiveBytes`` is a dispatch mode that sees every op's outputs, remembers each new storage by a
weak reference to the storage itself (not to a Python wrapper), and so knows at any moment how
many of the bytes it saw allocated are still alive.  It works on any device, CPU included,
where there are no allocator statistics:

    with LiveBytes() as mem:
        loss = pmodel(ids).logits.sum()
    mem.live     # bytes the forward allocated that are still held: what backward will read
    mem.peak     # the most that were alive at once

Views share their base's storage and are counted once; a storage resized in place (FSDP2's
free of an unsharded parameter) counts at its size now.  Parameters and inputs that exist
before the block are not counted (they were not allocated inside it).
"""
from __future__ import annotations

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode


class LiveBytes(TorchDispatchMode):
    """Bytes allocated inside the block that are alive now (``live``) and at the peak (``peak``)."""

    def __init__(self, on_op=None):
        super().__init__()
        self._storages: dict[int, tuple[StorageWeakRef, int]] = {}   # cdata -> (weak ref, bytes)
        self._live = 0
        self.peak = 0
        self._on_op = on_op                   # called after each op (a test's own probe)

    @property
    def live(self) -> int:
        self._prune()
        return self._live

    def _prune(self) -> None:
        """Forget the storages freed since, and re-read the size of those resized in place (FSDP2
        frees an unsharded parameter by resizing its storage to 0, not by dropping it)."""
        for k, (ref, n) in list(self._storages.items()):
            if ref.expired():
                self._live -= n
                del self._storages[k]
                continue
            now = torch.UntypedStorage._new_with_weak_ptr(ref.cdata).nbytes()
            if now != n:
                self._live += now - n
                self._storages[k] = (ref, now)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        # a view's storage is its input's: allocated here only if no input holds it (a view of a
        # parameter made inside the block is not new memory)
        held = {t.untyped_storage()._cdata for t in pytree.tree_leaves((args, kwargs)) if _plain(t)}
        for t in pytree.tree_leaves(out):
            if _plain(t):
                storage = t.untyped_storage()
                key = storage._cdata
                if key not in self._storages and key not in held:
                    self._storages[key] = (StorageWeakRef(storage), storage.nbytes())
                    self._live += storage.nbytes()
        self._prune()
        self.peak = max(self.peak, self._live)
        if self._on_op is not None:
            self._on_op()
        return out


def _plain(t) -> bool:
    return isinstance(t, torch.Tensor) and type(t) is torch.Tensor and not t.is_meta
