import pytest

from blindtune.eval.generation import generate_texts
from blindtune.models import tiny_model


def test_batched_left_padded_generation_matches_one_prompt_at_a_time():
    loaded = tiny_model(num_layers=2, hidden_size=32)
    prompts = ["Question: a short one?\nAnswer:", "Definition: a much longer prompt with many more words in it\n", "Hi"]
    batched = generate_texts(loaded.model, loaded.tokenizer, prompts, max_new_tokens=6, batch_size=3)
    single = [generate_texts(loaded.model, loaded.tokenizer, [p], max_new_tokens=6)[0] for p in prompts]
    assert batched == single
    assert all(isinstance(text, str) for text in batched)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate_texts(loaded.model, loaded.tokenizer, prompts, max_new_tokens=0)
