import pytest
import torch

from blindtune.data import Example
from blindtune.models import tiny_model
from blindtune.models.adapters import AdapterConfig, AdapterKind, attach_adapter
from blindtune.training import TrainConfig, train
from blindtune.training.loop import batches, proximal_term

EXAMPLES = [Example(prompt=f"Definition: thing number {i}\nCategory:", target=" animal") for i in range(10)]


def test_batches_cycle_through_seeded_epochs():
    drawn = batches(EXAMPLES, batch_size=4, steps=5, seed=3)
    assert [len(b) for b in drawn] == [4] * 5
    first_epoch = [e for b in drawn for e in b][:10]
    assert sorted(e.prompt for e in first_epoch) == sorted(e.prompt for e in EXAMPLES)
    assert drawn == batches(EXAMPLES, batch_size=4, steps=5, seed=3)
    with pytest.raises(ValueError):
        batches([], 4, 1, 0)


def test_training_lowers_the_loss_on_a_memorisable_target():
    loaded = tiny_model(num_layers=2, hidden_size=32)
    adapted = attach_adapter(loaded.model, {1: 1}, AdapterConfig(kind=AdapterKind.LAYERS))
    config = TrainConfig(steps=20, batch_size=5, learning_rate=5e-2)
    first = train(
        adapted.model,
        loaded.tokenizer,
        EXAMPLES,
        TrainConfig(steps=1, batch_size=10, learning_rate=1e-9),
        seed=0,
        progress=False,
    )
    train(adapted.model, loaded.tokenizer, EXAMPLES, config, seed=0, progress=False)
    after = train(
        adapted.model,
        loaded.tokenizer,
        EXAMPLES,
        TrainConfig(steps=1, batch_size=10, learning_rate=1e-9),
        seed=0,
        progress=False,
    )
    # A random tiny model with tied 0.02-scale embeddings can lower its loss by well under 1 nat.
    assert after.mean_loss < first.mean_loss - 0.5
    assert after.examples_seen == 10 and after.tokens_seen > 0


def test_proximal_term_and_its_effect():
    p = torch.tensor([1.0, 2.0], requires_grad=True)
    assert proximal_term([p], [torch.zeros(2)], mu=0.5).item() == pytest.approx(0.25 * 5)

    # A strong proximal weight keeps the weights near the start.
    def moved(mu: float) -> float:
        loaded = tiny_model(num_layers=2, hidden_size=32)
        adapted = attach_adapter(loaded.model, {1: 1}, AdapterConfig(kind=AdapterKind.LAYERS))
        before = {k: v.clone() for k, v in adapted.state().items()}
        train(
            adapted.model,
            loaded.tokenizer,
            EXAMPLES,
            TrainConfig(steps=8, batch_size=5, learning_rate=1e-2, proximal_mu=mu),
            seed=0,
            progress=False,
        )
        return sum(float((v - before[k]).norm()) for k, v in adapted.state().items())

    assert moved(100.0) < moved(0.0)
