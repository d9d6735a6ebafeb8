import copy

import pytest
import torch

from blindtune.conftest import emulator_pair
from blindtune.models.distill import (
    HELDOUT_TEXTS,
    DistillConfig,
    ProxyPrompts,
    TextBatches,
    _distill_loss,
    distill_emulator,
    hidden_distance,
    public_texts,
)


def test_public_text_is_split_and_never_the_clients_task(texts):
    assert len(texts.heldout) == HELDOUT_TEXTS and len(texts.train) > 1000
    assert not set(texts.heldout) & set(texts.train)
    with pytest.raises(ValueError, match="clients' task"):
        public_texts("task:wordnet-supersense", task="wordnet-supersense")
    with pytest.raises(ValueError):
        public_texts("no-such-source")


def test_hidden_state_losses_are_zero_for_an_emulator_identical_to_the_llm(tiny, texts):
    pair = emulator_pair(tiny.model, keep_every=1)  # the middle block is kept whole: emulator == LLM
    config = DistillConfig(ppd_weight=10.0, proxy=ProxyPrompts(length=3, std=20.0, token_fraction=0.5))
    ids, mask = TextBatches(tiny.tokenizer, texts.train[:64], 32, seed=0).next(8)
    _, parts = _distill_loss(pair, ids, mask, config, torch.Generator().manual_seed(0))  # (also back-propagates)
    assert parts["kd"] < 1e-10 and parts["ppd"] < 1e-10
    assert parts["lm"] > 0
    reference = torch.randn(2, 3, 8)
    assert hidden_distance(reference, reference, torch.ones(2, 3)).item() == 0.0
    assert hidden_distance(reference, torch.zeros_like(reference), torch.ones(2, 3)).item() == pytest.approx(1.0)


def test_distillation_brings_the_middle_block_closer_to_the_llm(tiny, texts):
    pair = emulator_pair(copy.deepcopy(tiny.model), keep_every=2)
    config = DistillConfig(steps=20, batch_size=4, max_length=16, learning_rate=3e-3, ppd_weight=10.0)
    history = distill_emulator(pair, tiny.tokenizer, texts.train[:400], config, progress=False)
    first, last = history[:4], history[-4:]
    assert sum(h["kd"] for h in last) < 0.7 * sum(h["kd"] for h in first)
    assert sum(h["ppd"] for h in last) < 0.7 * sum(h["ppd"] for h in first)
    adapter_params = [p for i in (0, 5) for p in pair.llm.get_decoder().layers[i].parameters()]
    emulator_adapter = [p for i in (0, 3) for p in pair.emulator.get_decoder().layers[i].parameters()]
    assert all(torch.equal(a, b) for a, b in zip(adapter_params, emulator_adapter, strict=True))  # adapters frozen
