"""The cache slots of one cache context: what computed units wrote for later steps to read.

Unit k's slot is s = k; with a linear forecast its second is K + k (forecast.py). An entry is a tensor (B, N, D), a
tuple of one per stream for a unit that feeds several residual streams (Flux's joint attention), or None (empty).
`write` hands out an entry to fill, (re)allocated where its shape, dtype or device differs from the output's; `read`
raises where no earlier step of the generation filled the entry for these hidden states.
"""

import torch


class SlotStore:
    """units: the engine's K (name, module) pairs (the names for errors); count: the slots (K, or 2K with a
    forecast), empty."""

    def __init__(self, units: list, count: int):
        self.units = units
        self.entries = [None] * count

    def resize(self, count: int) -> None:
        """Keep the first `count` entries, the new ones empty."""
        self.entries = (self.entries + [None] * count)[:count]

    def _part(self, s, part):
        """Entry s's tensor for stream `part` of a several-stream unit (its entry a tuple), else None."""
        entry = self.entries[s]
        return entry[part] if isinstance(entry, tuple) and part < len(entry) else None

    def write(self, s, like, part) -> torch.Tensor:
        """The tensor of slot s (stream `part`, None: a one-stream unit) to write `like` (B, N, D) into."""
        slot = self.entries[s] if part is None else self._part(s, part)
        if slot is None or slot.shape != like.shape or slot.dtype != like.dtype or slot.device != like.device:
            slot = torch.empty_like(like, memory_format=torch.contiguous_format)
            if part is None:
                self.entries[s] = slot
            else:
                parts = list(self.entries[s]) if isinstance(self.entries[s], tuple) else []
                parts += [None] * (part + 1 - len(parts))
                parts[part] = slot
                self.entries[s] = tuple(parts)
        return slot

    def read(self, s, h, part, step: int) -> torch.Tensor:
        """The tensor of slot s (stream `part`) that step `step` adds to hidden states h (B, N, D)."""
        slot = self.entries[s] if part is None else self._part(s, part)
        if slot is None or slot.shape != h.shape or slot.dtype != h.dtype or slot.device != h.device:
            name = self.units[s % len(self.units)][0] + ("" if part is None else f" (stream {part})")
            raise RuntimeError(f"{name}: step {step} reuses a cache slot that no earlier step of this "
                               f"generation filled for hidden states {tuple(h.shape)} {h.dtype}")
        return slot

    def nbytes(self) -> int:
        """Bytes of the filled entries."""
        parts = [part for entry in self.entries for part in (entry if isinstance(entry, tuple) else (entry,))]
        return sum(p.numel() * p.element_size() for p in parts if p is not None)
