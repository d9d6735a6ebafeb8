import json

import pytest
import torch
from opacus.grad_sample import GradSampleModule
from torch import nn

from blindtune.data import Example
from blindtune.encoding import collate_pairs, encode_pair
from blindtune.models import tiny_model
from blindtune.models.adapters import AdapterConfig, AdapterKind, attach_adapter
from blindtune.privacy.accountant import ACCOUNTANT_FILE
from blindtune.privacy.config import DPSGDConfig, PrivacyConfig
from blindtune.privacy.context import client_privacy
from blindtune.privacy.dp import (
    DeltaTooLargeError,
    DPUnsupportedError,
    PrivacyBudgetExceededError,
    check_privatizable,
    per_example_loss,
    train_private,
)
from blindtune.training import TrainConfig, train
from blindtune.training.loop import PrivateTrainingRequiredError

EXAMPLES = [
    Example(prompt=f"Definition: thing number {i}\nCategory:", target=" animal" if i % 2 else " plant")
    for i in range(24)
]
TRAIN = TrainConfig(steps=3, batch_size=6, learning_rate=1e-2, max_length=32)


def lora_model(kind=AdapterKind.LORA):
    loaded = tiny_model(num_layers=2, hidden_size=32)
    return loaded, attach_adapter(loaded.model, {1: 1}, AdapterConfig(kind=kind, lora_rank=2))


def test_opacus_per_example_gradients_match_autograd_per_example():
    loaded, adapted = lora_model()
    model = adapted.model
    model.train()
    pad = loaded.tokenizer.pad_token_id or loaded.tokenizer.eos_token_id
    pairs = [encode_pair(loaded.tokenizer, e.prompt, e.target, 32) for e in EXAMPLES[:4]]
    parameters = [p for p in model.parameters() if p.requires_grad]
    expected = []
    for pair in pairs:  # one example at a time: the definition of a per-example gradient
        model.zero_grad()
        per_example_loss(model, collate_pairs([pair], pad)).sum().backward()
        expected.append([p.grad.detach().clone() for p in parameters])
    model.zero_grad()
    wrapped = GradSampleModule(model, loss_reduction="mean")
    per_example_loss(model, collate_pairs(pairs, pad)).mean().backward()
    for index, parameter in enumerate(parameters):
        for row in range(len(pairs)):
            torch.testing.assert_close(parameter.grad_sample[row], expected[row][index], atol=1e-5, rtol=1e-4)
    wrapped.cleanup()


@pytest.mark.parametrize("kind", [AdapterKind.LORA, AdapterKind.LAYERS])
def test_dp_sgd_trains_and_composes_epsilon_over_rounds(kind, tmp_path):
    loaded, adapted = lora_model(kind)
    before = {k: v.clone() for k, v in adapted.state().items()}
    dp = DPSGDConfig(enabled=True, noise_multiplier=1.0, max_grad_norm=1.0)
    spent = []
    for round_number in (1, 2, 3):
        stats, result = train_private(
            adapted.model, loaded.tokenizer, EXAMPLES, TRAIN, dp, tmp_path, seed=round_number,
            round_number=round_number, planned_rounds=3, progress=False,
        )  # fmt: skip
        spent.append(result)
        assert stats.tokens_seen > 0 and result.steps == 3
    assert [s.total_steps for s in spent] == [3, 6, 9]
    assert spent[0].epsilon < spent[1].epsilon < spent[2].epsilon
    assert spent[0].delta == pytest.approx(min(1e-5, 1 / (10 * len(EXAMPLES))))
    assert spent[0].sample_rate == pytest.approx(1 / 4)
    assert any(not torch.equal(before[k], v) for k, v in adapted.state().items())
    saved = json.loads((tmp_path / ACCOUNTANT_FILE).read_text())
    assert saved["rounds"] == [1, 2, 3] and saved["history"] == [[1.0, 0.25, 9]]
    # Opacus is gone from the model afterwards: no hooks, no per-example gradients left behind.
    assert not any(hasattr(p, "grad_sample") for p in adapted.model.parameters())
    assert spent[-1].metrics()["dp_epsilon"] == pytest.approx(spent[-1].epsilon)


@pytest.mark.parametrize("delta", [1 / len(EXAMPLES), 0.5])
def test_a_delta_of_one_over_n_or_more_is_refused_before_any_step(delta, tmp_path):
    loaded, adapted = lora_model()
    before = {k: v.clone() for k, v in adapted.state().items()}
    dp = DPSGDConfig(enabled=True, noise_multiplier=1.0, delta=delta)
    with pytest.raises(DeltaTooLargeError, match=r"privacy.dp.delta .* >= 1/N = 1/24"):
        train_private(
            adapted.model, loaded.tokenizer, EXAMPLES, TRAIN, dp, tmp_path, seed=0, round_number=1,
            planned_rounds=1, progress=False,
        )  # fmt: skip
    assert all(torch.equal(before[k], v) for k, v in adapted.state().items())


def test_empty_poisson_batches_still_take_a_noisy_step_and_count(tmp_path):
    loaded, adapted = lora_model()
    config = TrainConfig(steps=12, batch_size=1, learning_rate=1e-2, max_length=32)  # q = 1/24: empty batches
    stats, spent = train_private(
        adapted.model, loaded.tokenizer, EXAMPLES, config, DPSGDConfig(enabled=True, noise_multiplier=1.0),
        tmp_path, seed=5, round_number=1, planned_rounds=1, progress=False,
    )  # fmt: skip
    assert spent.steps == spent.total_steps == 12
    assert spent.noise_only_steps > 0 and stats.tokens_seen > 0


def test_more_noise_means_less_epsilon_for_the_same_training(tmp_path):
    epsilons = []
    for noise in (0.7, 1.5):
        loaded, adapted = lora_model()
        _, spent = train_private(
            adapted.model, loaded.tokenizer, EXAMPLES, TRAIN, DPSGDConfig(enabled=True, noise_multiplier=noise),
            tmp_path / str(noise), seed=0, round_number=1, planned_rounds=1, progress=False,
        )  # fmt: skip
        epsilons.append(spent.epsilon)
    assert epsilons[0] > epsilons[1]


def test_target_epsilon_calibrates_noise_for_the_planned_rounds_and_refuses_more(tmp_path):
    loaded, adapted = lora_model()
    dp = DPSGDConfig(enabled=True, target_epsilon=4.0)
    for round_number in (1, 2):
        _, spent = train_private(
            adapted.model, loaded.tokenizer, EXAMPLES, TRAIN, dp, tmp_path, seed=round_number,
            round_number=round_number, planned_rounds=2, progress=False,
        )  # fmt: skip
    assert 3.0 < spent.epsilon <= 4.0 * 1.01
    with pytest.raises(PrivacyBudgetExceededError):
        train_private(
            adapted.model, loaded.tokenizer, EXAMPLES, TRAIN, dp, tmp_path, seed=3, round_number=3,
            planned_rounds=2, progress=False,
        )  # fmt: skip


class WithBatchNorm(nn.Module):
    """A stand-in for a method whose trainable part Opacus cannot handle (batch statistics, buffers)."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 4)
        self.norm = nn.BatchNorm1d(4)


def test_a_model_opacus_cannot_make_private_is_refused_before_any_step(tmp_path):
    with pytest.raises(DPUnsupportedError, match="Opacus cannot make this model private"):
        check_privatizable(WithBatchNorm())
    loaded, adapted = lora_model()
    adapted.model.add_module("extra_norm", nn.BatchNorm1d(4))  # trainable, never even used
    before = {k: v.clone() for k, v in adapted.model.named_parameters() if v.requires_grad}
    with pytest.raises(DPUnsupportedError, match="BatchNorm"):
        train_private(
            adapted.model, loaded.tokenizer, EXAMPLES, TRAIN, DPSGDConfig(enabled=True, noise_multiplier=1.0),
            tmp_path, seed=0, round_number=1, planned_rounds=1, progress=False,
        )  # fmt: skip
    assert all(torch.equal(before[k], v) for k, v in adapted.model.named_parameters() if v.requires_grad)
    assert not (tmp_path / ACCOUNTANT_FILE).exists()


def test_plain_training_is_refused_while_a_client_policy_demands_dp(tmp_path):
    loaded, adapted = lora_model()
    policy = PrivacyConfig(dp=DPSGDConfig(enabled=True, noise_multiplier=1.0))
    with client_privacy(policy, tmp_path, planned_rounds=1), pytest.raises(PrivateTrainingRequiredError):
        train(adapted.model, loaded.tokenizer, EXAMPLES, TRAIN, seed=0, progress=False)
    train(adapted.model, loaded.tokenizer, EXAMPLES, TRAIN, seed=0, progress=False)  # outside: allowed
    with client_privacy(PrivacyConfig(), tmp_path, planned_rounds=1):
        train(adapted.model, loaded.tokenizer, EXAMPLES, TRAIN, seed=0, progress=False)  # DP off: allowed
