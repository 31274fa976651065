"""Learning-to-Cache's own router training (Ma et al., NeurIPS 2024), for the original DiT DDIM sampler.

L2C trains on real images, one denoising step at a time (its DiT `train_router.py` and
`router_training_losses`, read, not copied). One iteration:
1. a batch of real images x0 (B, C, H, W) with their class labels, each label replaced by the null class
   with probability `label_dropout` (the model's classifier-free-guidance dropout; no CFG batch);
2. one routed step i for the whole batch, drawn uniformly from `routed_steps(T)`: the steps that L2C's
   alternating inference lets the router decide (`CacheSchedule.from_gates` rule "l2c-alternating");
   the step before, i - 1, always computes every unit;
3. x_{i-1} = sqrt(a) x0 + sqrt(1 - a) noise at step i-1's timestep; the full model at step i-1 fills the
   cache and one DDIM step gives x_i (no gradient);
4. at step i the full model (teacher, the cache untouched) and the soft-gated model (student:
   `r * fresh + (1 - r) * cache`, r = sigmoid(theta[i])) see x_i;
   loss = mean((teacher - student)^2) + beta * sum_k r[i, k];
5. AdamW on row i only (one parameter per row, as L2C's per-step routers), then the logits are clamped.

The router is the same `Router` (same file format), with `info.rule = "l2c-alternating"`. The
transformer is patched (a `CacheEngine`, frozen, eval mode) only inside `run()`, restored however it ends.
"""

import contextlib
import math
from dataclasses import dataclass

import torch

from .kernels import solver_step
from .router import LOGIT_BOUND, Router, RouterInfo, dit_ddim_timesteps
from .samplers import dit_alphas_cumprod, dit_ddim_table
from .training import engine_attached
from .units import cached_units

BETA_GAIN = 2.0  # target_cur: after each pass over the routed steps, beta *= exp(gain * (target - CUR))
BETA_RANGE = 1e4  # ... within [beta / BETA_RANGE, beta * BETA_RANGE] of the configured beta (no windup)


@dataclass
class L2CConfig:
    num_steps: int = 10
    iterations: int = 1000
    batch: int = 32  # real images per iteration
    lr: float = 1e-2
    beta: float = 1e-4  # weight of sum_k r[i, k]
    tau: float = 0.1  # inference threshold recorded in the router
    label_dropout: float = 0.1
    seed: int = 0
    target_cur: float | None = None  # adjust beta towards this CUR (alternating rule, at tau); at most ~0.5

    def __post_init__(self):
        if self.num_steps < 2:
            raise ValueError(f"num_steps: expected >= 2 (L2C routes every other step), got {self.num_steps}")
        if self.batch < 1 or self.iterations < 0:
            raise ValueError(f"batch, iterations: expected >= 1 and >= 0, got {self.batch}, {self.iterations}")
        if not 0 <= self.label_dropout < 1:
            raise ValueError(f"label_dropout: expected a value in [0, 1), got {self.label_dropout}")
        if self.target_cur is not None and not 0 < self.target_cur < 1:
            raise ValueError(f"target_cur: expected a value in (0, 1), got {self.target_cur}")


def routed_steps(num_steps: int) -> list:
    """Denoising steps (0 = noisiest) whose row the l2c-alternating rule consults: ascending-timestep row
    T-1-i even, and i >= 1 (step 0 fills the cache). Each is preceded by a step that computes all."""
    return [i for i in range(1, num_steps) if (num_steps - 1 - i) % 2 == 0]


class L2CTrainer:
    """L2C's training of a `Router` for a class-conditional diffusers DiT on real images.

    images: (N, C, H, W) in the model's input range; labels: (N,) int class indices.
    """

    def __init__(self, transformer, images: torch.Tensor, labels: torch.Tensor, config: L2CConfig):
        cfg = transformer.config
        shape = (cfg.in_channels, cfg.sample_size, cfg.sample_size)
        if images.dim() != 4 or tuple(images.shape[1:]) != shape or labels.shape != images.shape[:1]:
            raise ValueError(f"images, labels: expected (N, {', '.join(map(str, shape))}) and (N,), got "
                             f"{tuple(images.shape)} and {tuple(labels.shape)}")
        self.transformer, self.config = transformer, config
        self.images, self.labels = images, labels.long()
        self.num_classes = cfg.num_embeds_ada_norm
        self.device = next(transformer.parameters()).device
        self.timesteps = dit_ddim_timesteps(config.num_steps)
        self.coefficients = dit_ddim_table(config.num_steps).tensor(self.device)
        self.alphas = dit_alphas_cumprod().float()
        self.steps = routed_steps(config.num_steps)
        info = RouterInfo.for_model(transformer, sampler="dit-ddim", timesteps=self.timesteps, tau=config.tau,
                                    rule="l2c-alternating")
        num_units = len(cached_units(transformer))
        self.router = Router(config.num_steps, num_units, info=info,
                             generator=torch.Generator().manual_seed(config.seed))
        # one parameter per routed row: AdamW skips the rows without a gradient (L2C's per-step routers)
        self.rows = {i: torch.nn.Parameter(self.router.logits.detach()[i].clone()) for i in self.steps}
        self.optimizer = torch.optim.AdamW(list(self.rows.values()), lr=config.lr, weight_decay=0.0)
        self.gen = torch.Generator().manual_seed(config.seed * 7919 + 2)
        self.beta = config.beta
        self.iteration = 0
        self.engine = None

    @contextlib.contextmanager
    def attached(self):
        """The transformer frozen, in eval mode and run by a CacheEngine; restored on exit."""
        with engine_attached(self.transformer) as self.engine:
            try:
                yield self
            finally:
                self.engine = None

    def _forward(self, x, labels, i: int, gates=None, *, fill: bool = False):
        """Output (B, C', H, W) at step i: full compute (gates None; with `fill`, the slots filled) or soft
        gating with `gates` (T, K)."""
        engine = self.engine
        if gates is None and not fill:
            engine.set_off()
        else:
            engine.set_training(gates if gates is not None else torch.ones(len(self.timesteps), len(engine.units)),
                                self.config.tau)
        engine.seek(0 if fill else i)  # the engine fills every slot at its step 0
        t = torch.full((x.shape[0],), self.timesteps[i], dtype=torch.long, device=self.device)
        return self.transformer(hidden_states=x, timestep=t, class_labels=labels).sample

    def batch(self, generator: torch.Generator) -> tuple:
        """(x0 (B, C, H, W), labels (B,) with dropped labels as the null class, routed step i, noise)."""
        cfg = self.config
        index = torch.randint(0, len(self.images), (cfg.batch,), generator=generator)
        drop = torch.rand(cfg.batch, generator=generator) < cfg.label_dropout
        labels = torch.where(drop, self.num_classes, self.labels[index])
        i = self.steps[torch.randint(0, len(self.steps), (1,), generator=generator).item()]
        noise = torch.randn(self.images[index].shape, generator=generator)
        return self.images[index], labels, i, noise

    def loss(self, x0, labels, i: int, noise) -> tuple:
        """(mse, sum_k r[i, k]) of one batch at routed step i; attached."""
        x0, labels, noise = x0.to(self.device), labels.to(self.device), noise.to(self.device)
        with torch.no_grad():
            a = self.alphas[self.timesteps[i - 1]].item()
            x = math.sqrt(a) * x0 + math.sqrt(1 - a) * noise
            x = solver_step(x, self._forward(x, labels, i - 1, fill=True), self.coefficients[i - 1])[0]
            teacher = self._forward(x, labels, i)
        row = torch.sigmoid(self.rows[i])
        gates = torch.ones(len(self.timesteps), row.shape[0], device=self.device).index_copy(
            0, torch.tensor([i], device=self.device), row[None])
        student = self._forward(x, labels, i, gates)
        return torch.mean((teacher.float() - student.float()) ** 2), row.sum()

    def train_step(self) -> dict:
        cfg = self.config
        x0, labels, i, noise = self.batch(self.gen)
        mse, l1 = self.loss(x0, labels, i, noise)
        loss = mse + self.beta * l1
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        with torch.no_grad():
            row = self.rows[i]
            row.clamp_(-LOGIT_BOUND, LOGIT_BOUND)
            self.router.logits[i] = row
        self.iteration += 1
        if cfg.target_cur is not None and self.iteration % len(self.steps) == 0:
            cur = self.router.schedule(cfg.tau).cur
            beta = self.beta * math.exp(BETA_GAIN * (cfg.target_cur - cur))
            self.beta = min(max(beta, cfg.beta / BETA_RANGE), cfg.beta * BETA_RANGE)
        return {"iteration": self.iteration, "step": i, "loss": loss.item(), "mse": mse.item(), "l1": l1.item(),
                "beta": self.beta}

    def run(self) -> Router:
        """Train for `config.iterations`; returns the router (info.iterations set)."""
        with self.attached():
            while self.iteration < self.config.iterations:
                self.train_step()
        info = self.router.info
        info.complete, info.iterations, info.planned_iterations = True, self.iteration, self.config.iterations
        return self.router
