import copy

import pytest
import torch

from blindtune.data import Example
from blindtune.encoding import collate_pairs, continuation_loss, last_hidden_states
from blindtune.eval.scoring import evaluate_choices
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
from blindtune.models.soft_prompt import SOFT_PROMPT_NAME, SoftPromptModel, prompt_from_tokens, run_with_prompt
from blindtune.models.surgery import build_emulator, plan_layers

IDS = torch.tensor([[11, 22, 33, 44, 55], [66, 77, 88, 0, 0]])
MASK = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
SOFT = AdapterConfig(kind=AdapterKind.SOFT_PROMPT, prompt_length=3)


@pytest.fixture(scope="module")
def tiny():
    return tiny_model(num_layers=4, hidden_size=32)


def test_zero_length_prompt_leaves_the_llm_unchanged(tiny):
    llm = tiny.model
    reference = last_hidden_states(llm, IDS, MASK)
    state = {SOFT_PROMPT_NAME: torch.zeros(0, 32)}
    with plugged_in(llm, state, SOFT) as plugged:
        assert torch.equal(last_hidden_states(plugged, IDS, MASK), reference)
        assert torch.equal(plugged(input_ids=IDS, attention_mask=MASK).logits, llm(IDS, attention_mask=MASK).logits)


def test_untrained_prompt_is_the_text_of_its_tokens(tiny):
    """A prompt made of real tokens' embeddings equals reading those tokens before the input."""
    llm = tiny.model
    tokens = [101, 202, 303]
    state = {SOFT_PROMPT_NAME: prompt_from_tokens(llm, tokens)}
    with plugged_in(llm, state, SOFT) as plugged:
        prompted = last_hidden_states(plugged, IDS, MASK)
    prefixed_ids = torch.cat([torch.tensor([tokens] * 2), IDS], dim=1)
    prefixed_mask = torch.cat([torch.ones(2, 3, dtype=torch.long), MASK], dim=1)
    as_text = last_hidden_states(llm, prefixed_ids, prefixed_mask)[:, 3:]
    assert prompted.shape == (2, 5, 32)
    assert torch.allclose(prompted[0], as_text[0], atol=1e-5)
    assert torch.allclose(prompted[1, :3], as_text[1, :3], atol=1e-5)  # padded positions are not compared


def test_untrained_state_is_seeded_real_token_embeddings_and_changes_outputs(tiny):
    llm = tiny.model
    first = untrained_adapter_state(copy.deepcopy(llm), {}, SOFT, seed=3)
    again = untrained_adapter_state(copy.deepcopy(llm), {}, SOFT, seed=3)
    assert set(first) == {SOFT_PROMPT_NAME} and first[SOFT_PROMPT_NAME].shape == (3, 32)
    assert torch.equal(first[SOFT_PROMPT_NAME], again[SOFT_PROMPT_NAME])
    table = llm.get_input_embeddings().weight
    assert all((table == row).all(dim=1).any() for row in first[SOFT_PROMPT_NAME])
    with plugged_in(llm, first, SOFT) as plugged:
        assert not torch.allclose(last_hidden_states(plugged, IDS, MASK), last_hidden_states(llm, IDS, MASK))


def test_only_the_prompt_trains_and_it_plugs_into_the_llm(tiny):
    llm = tiny.model
    plan = plan_layers(4, 1, 2)
    emulator = build_emulator(llm, plan)
    adapted = attach_adapter(emulator, {0: 0, 2: 3}, SOFT, seed=0)
    assert [name for name, p in adapted.model.named_parameters() if p.requires_grad] == [SOFT_PROMPT_NAME]
    batch = collate_pairs([([5, 6, 7, 8], 2), ([9, 10, 11], 1)], 0)
    optimizer = torch.optim.SGD(adapted.model.parameters(), lr=1.0)
    before = adapted.state()[SOFT_PROMPT_NAME]
    loss = continuation_loss(adapted.model, batch)
    loss.backward()
    optimizer.step()
    state = adapted.state()
    assert set(state) == {SOFT_PROMPT_NAME} and not torch.equal(state[SOFT_PROMPT_NAME], before)
    adapted.load_state(state)  # the state round-trips through the generic loader
    with plugged_in(llm, state, SOFT) as plugged:
        assert isinstance(plugged, SoftPromptModel)
        direct = SoftPromptModel(llm, prompt=state[SOFT_PROMPT_NAME])
        assert torch.equal(last_hidden_states(plugged, IDS, MASK), last_hidden_states(direct, IDS, MASK))


def test_bad_states_are_refused(tiny):
    llm = tiny.model
    with pytest.raises(IncompatibleAdapterError), plugged_in(llm, {SOFT_PROMPT_NAME: torch.zeros(2, 7)}, SOFT):
        pass
    with (
        pytest.raises(IncompatibleAdapterError, match="NaN"),
        plugged_in(llm, {SOFT_PROMPT_NAME: torch.full((2, 32), float("nan"))}, SOFT),
    ):
        pass
    with pytest.raises(IncompatibleAdapterError):
        plug_in(llm, {SOFT_PROMPT_NAME: torch.zeros(2, 32)}, SOFT)
    with pytest.raises(ValueError):
        AdapterConfig(kind=AdapterKind.SOFT_PROMPT, prompt_length=-1)


def test_per_row_prompts_and_evaluation_run_through_the_wrapper(tiny):
    llm = tiny.model
    decoder, embeddings = llm.get_decoder(), llm.get_input_embeddings()
    prompts = torch.randn(2, 4, 32)
    out = run_with_prompt(decoder, embeddings, prompts, IDS, MASK).last_hidden_state
    single = run_with_prompt(decoder, embeddings, prompts[1], IDS[1:], MASK[1:]).last_hidden_state
    assert out.shape == (2, 5, 32) and torch.allclose(out[1, :3], single[0, :3], atol=1e-5)
    example = Example(
        prompt="Definition: a small dog\nCategory:", target=" animal", choices=(" animal", " food"), label=0
    )
    with plugged_in(llm, untrained_adapter_state(copy.deepcopy(llm), {}, SOFT, seed=0), SOFT) as plugged:
        result = evaluate_choices(plugged, tiny.tokenizer, [example, example], progress=False)
    assert result.num_examples == 2
