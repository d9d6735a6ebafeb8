import copy

import pytest
import torch

from blindtune.models import tiny_model
from blindtune.models.adapters import (
    AdapterConfig,
    AdapterKind,
    IncompatibleAdapterError,
    attach_adapter,
    plug_in,
    plugged_in,
    untrained_adapter_state,
)
from blindtune.models.surgery import build_emulator, plan_layers

IDS = torch.tensor([[11, 22, 33, 44, 55]])
ADAPTER_KINDS = [AdapterConfig(kind=AdapterKind.LAYERS), AdapterConfig(kind=AdapterKind.LORA, lora_rank=4)]


def _setup(config):
    llm = tiny_model(num_layers=6).model
    plan = plan_layers(6, 1, 2)
    emulator = build_emulator(llm, plan)
    layer_map = {plan.emulator_position_of[s]: s for s in plan.adapter_layers}
    return llm, emulator, layer_map


@pytest.mark.parametrize("config", ADAPTER_KINDS, ids=lambda c: c.kind.value)
def test_untrained_adapter_plugs_in_exactly(config):
    llm, emulator, layer_map = _setup(config)
    before = llm(input_ids=IDS).logits
    state = untrained_adapter_state(copy.deepcopy(emulator), layer_map, config, seed=0)
    plug_in(llm, state, config)
    assert torch.equal(llm(input_ids=IDS).logits, before)


@pytest.mark.parametrize("config", ADAPTER_KINDS, ids=lambda c: c.kind.value)
def test_trained_adapter_on_emulator_equals_same_adapter_in_llm_layers(config):
    llm, emulator, layer_map = _setup(config)
    adapted = attach_adapter(emulator, layer_map, config)
    with torch.no_grad():
        for parameter in adapted.named_adapter_parameters().values():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    state = adapted.state()
    assert all(name.startswith(("layers.0.", "layers.5.")) for name in state)
    reference = llm(input_ids=IDS).logits
    with plugged_in(llm, state, config) as plugged:
        changed = plugged(input_ids=IDS).logits
    assert not torch.allclose(changed, reference)
    assert torch.equal(llm(input_ids=IDS).logits, reference)  # restored on exit
    # Loading the state into a fresh adapter on the LLM's own layers gives the plugged-in outputs.
    direct = attach_adapter(copy.deepcopy(llm), {0: 0, 5: 5}, config)
    direct.load_state(state)
    assert torch.allclose(direct.model(input_ids=IDS).logits, changed, atol=1e-5)


def test_lora_state_holds_only_small_matrices():
    config = AdapterConfig(kind=AdapterKind.LORA, lora_rank=2, lora_targets=["q_proj", "v_proj"])
    _, emulator, layer_map = _setup(config)
    state = attach_adapter(emulator, layer_map, config).state()
    assert len(state) == 2 * 2 * 2  # 2 layers x 2 modules x (A, B)
    assert all(".lora_A." in n or ".lora_B." in n for n in state)


@pytest.mark.parametrize("config", ADAPTER_KINDS, ids=lambda c: c.kind.value)
def test_incompatible_states_are_refused(config):
    llm, emulator, layer_map = _setup(config)
    adapted = attach_adapter(emulator, layer_map, config)
    state = adapted.state()
    name = next(iter(state))
    with pytest.raises(IncompatibleAdapterError, match="missing"):
        adapted.load_state({k: v for k, v in state.items() if k != name})
    with pytest.raises(IncompatibleAdapterError, match="shape"):
        adapted.load_state({**state, name: torch.zeros(3, 3)})
    with pytest.raises(IncompatibleAdapterError, match="NaN"):
        adapted.load_state({**state, name: torch.full_like(state[name], float("nan"))})
    with pytest.raises(IncompatibleAdapterError):
        plug_in(llm, {f"layers.40.{name.split('.', 2)[2]}": state[name]}, config)
