"""DiT's adaLN modulations of every step, computed once per generation (method.md section 3).

Each DiT block turns the step's timestep/class embedding into six (B, D) modulations (shift, scale,
gate of attention and MLP) with a D -> 6D linear. These do not depend on the hidden states, so when the
generation's timesteps are known in advance (a pipeline's scheduler, `dit_ddim_sample`) all T steps are
computed at step 0 in one batched linear per block: each block's weights are read once per generation
instead of once per step. Each step then copies its (L, B, 6D) slice into one static buffer, which
the blocks (and captured graphs) read.

Only when every block holds the same embedder (diffusers copies the original DiT's single embedder
into each block), and only for forwards whose timestep is the generation's timestep of that step and
whose class labels stay those of step 0, as in a pipeline or `dit_ddim_sample`.
"""

import torch


class ModulationTable:
    """`modulations` (T, L, B, 6D) for T steps and L blocks; `step_buffer` (L, B, 6D) holds the current
    step's and keeps its address across generations of one shape (captured graphs read it)."""

    def __init__(self):
        self.modulations = None
        self.step_buffer = None

    def compute(self, blocks, timesteps: list, class_labels: torch.Tensor, dtype: torch.dtype) -> None:
        """All steps' modulations for `class_labels` (B,) at `timesteps` (T host values), in `dtype`."""
        steps, batch = len(timesteps), class_labels.shape[0]
        # (T*B,) step-major; an asynchronous upload (pageable memory is staged before the call returns)
        t = torch.tensor(timesteps).to(class_labels.device, non_blocking=True).repeat_interleave(batch)
        embedding = torch.nn.functional.silu(blocks[0].norm1.emb(t, class_labels.repeat(steps), hidden_dtype=dtype))
        per_block = [block.norm1.linear(embedding).view(steps, batch, -1) for block in blocks]
        self.modulations = torch.stack(per_block, dim=1)
        step = self.modulations[0]
        buffer = self.step_buffer
        if buffer is None or buffer.shape != step.shape or buffer.dtype != step.dtype or buffer.device != step.device:
            self.step_buffer = torch.empty_like(step)

    def load(self, step: int) -> None:
        """Copy step `step`'s modulations into the static buffer."""
        self.step_buffer.copy_(self.modulations[step])

    def nbytes(self) -> int:
        tensors = [t for t in (self.modulations, self.step_buffer) if t is not None]
        return sum(t.numel() * t.element_size() for t in tensors)
