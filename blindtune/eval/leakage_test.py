import copy
import math

import pytest

from blindtune.conftest import emulator_pair
from blindtune.data import Example
from blindtune.eval.leakage import adapter_gradient_cosine, cpl, perplexities
from blindtune.models.adapters import AdapterConfig, AdapterKind, untrained_adapter_state


def test_measurements_on_an_identical_emulator(tiny, texts):
    llm = tiny.model
    pair = emulator_pair(llm, keep_every=1)
    ppl = perplexities(llm, pair.emulator, tiny.tokenizer, texts.heldout[:10], max_length=32)
    assert ppl["ppl_ratio"] == pytest.approx(1.0, abs=1e-4)
    assert cpl(0.3, 0.6) == pytest.approx(50.0) and math.isnan(cpl(0.3, 0.0))
    example = Example(prompt="Definition: a small dog\nCategory:", target=" animal", choices=(" animal",), label=0)
    layer_map = {pair.plan.emulator_position_of[s]: s for s in pair.plan.adapter_layers}
    for adapter in (AdapterConfig(kind=AdapterKind.LORA, lora_rank=2), AdapterConfig(kind=AdapterKind.SOFT_PROMPT)):
        state = untrained_adapter_state(copy.deepcopy(pair.emulator), layer_map, adapter, seed=0)
        cosine = adapter_gradient_cosine(llm, pair.emulator, layer_map, adapter, state, tiny.tokenizer, [example] * 2)
        assert cosine == pytest.approx(1.0, abs=1e-4)
