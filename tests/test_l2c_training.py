"""Learning-to-Cache's own training (harmonica/l2c_training.py) on the committed real digits."""

import math

import pytest
import torch

from harmonica import CacheSchedule, Router
from harmonica.digits import load_digits_dit, real_digits
from harmonica.l2c_training import BETA_GAIN, BETA_RANGE, L2CConfig, L2CTrainer, routed_steps


@pytest.fixture(scope="module")
def digits():
    return real_digits()


@pytest.mark.parametrize("steps", [4, 5, 10])
def test_routed_steps_are_the_rows_the_alternating_rule_consults(steps):
    schedule = CacheSchedule.from_gates(torch.zeros(steps, 3), 0.1, "l2c-alternating")
    consulted = [i for i, row in enumerate(schedule.rows) if not all(row)]
    assert routed_steps(steps) == consulted
    assert all(i - 1 not in routed_steps(steps) for i in routed_steps(steps))  # the step before computes all


def _trainer(digits, **overrides):
    config = L2CConfig(**{"num_steps": 4, "iterations": 16, "batch": 4, "lr": 0.3, "beta": 0.0, "seed": 3,
                          **overrides})
    return L2CTrainer(load_digits_dit(), *digits, config)


def test_training_reduces_the_loss_and_moves_only_the_routed_rows(digits):
    trainer = _trainer(digits)
    initial = trainer.router.logits.detach().clone()
    batches = [trainer.batch(torch.Generator().manual_seed(k)) for k in range(4)]

    def loss():
        with trainer.attached(), torch.no_grad():
            return sum(trainer.loss(*b)[0].item() for b in batches)

    before = loss()
    router = trainer.run()
    after = loss()
    assert after < 0.5 * before  # beta = 0: every gate is pushed towards computing
    moved = [i for i in range(4) if not torch.equal(router.logits[i], initial[i])]
    assert moved == routed_steps(4) == [1, 3]
    assert router.logits.abs().max() <= 5 and router.info.iterations == 16


def test_the_model_is_left_as_it_was(digits):
    trainer = _trainer(digits, iterations=2)
    model = trainer.transformer.train()
    model.transformer_blocks[1].requires_grad_(False)
    grads = [p.requires_grad for p in model.parameters()]
    trainer.run()
    assert model.training and all(m.training for m in model.modules())
    assert [p.requires_grad for p in model.parameters()] == grads
    assert not any("forward" in vars(block) for block in model.transformer_blocks)
    assert not model._forward_hooks and not model._forward_pre_hooks


def test_the_router_alternates_and_survives_a_round_trip(digits, tmp_path):
    router = _trainer(digits, iterations=4).run()
    assert router.info.rule == "l2c-alternating" and router.info.sampler == "dit-ddim"
    router.save_pretrained(tmp_path)
    loaded = Router.from_pretrained(tmp_path)
    for tau in (1e-3, 0.1, 0.5, 0.99):
        schedule = loaded.schedule(tau)
        assert schedule == router.schedule(tau)
        assert all(all(schedule.rows[i]) for i in range(4) if i not in routed_steps(4))
        assert schedule.cur <= 0.5


def test_target_cur_moves_beta_within_its_range(digits):
    trainer = _trainer(digits, lr=0.0, beta=1e-3, target_cur=0.45, iterations=2 * len(routed_steps(4)))
    cur = trainer.router.schedule(0.1).cur  # lr 0: the CUR stays
    trainer.run()
    assert trainer.beta == pytest.approx(1e-3 * math.exp(2 * BETA_GAIN * (0.45 - cur)), rel=1e-9)
    capped = _trainer(digits, lr=0.0, beta=1e-3, target_cur=0.99, iterations=10 * len(routed_steps(4)))
    capped.run()  # CUR <= 0.5 at lr 0: beta grows >= exp(2 * 0.49) per pass, past the cap in 10 passes
    assert capped.beta == pytest.approx(1e-3 * BETA_RANGE)


def test_bad_inputs_name_the_argument(digits):
    with pytest.raises(ValueError, match="label_dropout: expected a value in"):
        L2CConfig(label_dropout=1.0)
    with pytest.raises(ValueError, match="images, labels: expected"):
        L2CTrainer(load_digits_dit(), digits[0][:, :, :4], digits[1], L2CConfig())
