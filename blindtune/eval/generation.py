"""Batched greedy generation of free text (rationales, explanations) from a causal LM."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from blindtune.encoding import model_device, prompt_ids


@torch.inference_mode()
def generate_texts(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    *,
    max_new_tokens: int,
    batch_size: int = 16,
    max_prompt_tokens: int = 512,
    progress: bool = False,
    desc: str = "generate",
) -> list[str]:
    """Greedy continuation of each prompt (special tokens dropped), in the prompts' order.

    Prompts are batched by length and left-padded, so every row continues from the same position;
    a prompt longer than `max_prompt_tokens` keeps its end (where the question is asked).
    """
    if max_new_tokens < 1 or batch_size < 1:
        raise ValueError(f"max_new_tokens and batch_size must be >= 1, got {max_new_tokens} and {batch_size}")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    encoded = [prompt_ids(tokenizer, prompt)[-max_prompt_tokens:] for prompt in prompts]
    for index, ids in enumerate(encoded):
        if not ids:
            raise ValueError(f"prompt {index} has no tokens")
    order = sorted(range(len(prompts)), key=lambda index: len(encoded[index]))
    texts: dict[int, str] = {}
    generator: Any = model  # transformers types generate() against a private protocol of its own
    was_training = model.training
    model.eval()
    try:
        for start in tqdm(range(0, len(order), batch_size), desc=desc, disable=not progress, leave=False):
            chunk = order[start : start + batch_size]
            length = max(len(encoded[index]) for index in chunk)
            input_ids = torch.full((len(chunk), length), pad_id, dtype=torch.long)
            attention_mask = torch.zeros((len(chunk), length), dtype=torch.long)
            for row, index in enumerate(chunk):
                ids = encoded[index]
                input_ids[row, length - len(ids) :] = torch.tensor(ids)
                attention_mask[row, length - len(ids) :] = 1
            device = model_device(model)
            output = generator.generate(
                input_ids=input_ids.to(device),
                attention_mask=attention_mask.to(device),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=pad_id,
            )
            decoded = tokenizer.batch_decode(output[:, length:], skip_special_tokens=True)
            texts.update(zip(chunk, decoded, strict=True))
    finally:
        model.train(was_training)
    return [texts[index] for index in range(len(prompts))]
