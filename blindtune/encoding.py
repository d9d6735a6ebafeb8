"""Tokenise (prompt, continuation) pairs and score continuations; shared by training and evaluation.

Training minimises the loss of `Example.target` given `Example.prompt`, and evaluation compares the
log-likelihoods of `Example.choices`: both go through these functions, so a continuation is tokenised
and scored the same way whether it is learnt or measured.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

import torch
from torch import Tensor, nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase


class ChatPrompt(str):
    """A prompt that is a conversation (instruction data): its plain text is the fallback rendering, and
    `messages` ((role, content) pairs before the response) is rendered with the tokenizer's chat template
    when it has one. A `str`, so every path that tokenises prompts takes it unchanged."""

    messages: tuple[tuple[str, str], ...]

    def __new__(cls, plain: str, messages: tuple[tuple[str, str], ...]) -> ChatPrompt:
        prompt = super().__new__(cls, plain)
        prompt.messages = messages
        return prompt

    def __reduce__(self) -> tuple[type, tuple[str, tuple[tuple[str, str], ...]]]:
        return ChatPrompt, (str(self), self.messages)


def prompt_ids(tokenizer: PreTrainedTokenizerBase, prompt: str) -> list[int]:
    """Token ids of a prompt: a `ChatPrompt` through the chat template (with the assistant's turn opened)
    when the tokenizer has one, anything else as plain text with the tokenizer's default special tokens."""
    if isinstance(prompt, ChatPrompt) and tokenizer.chat_template:
        messages = [{"role": role, "content": content} for role, content in prompt.messages]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return list(tokenizer(str(text), add_special_tokens=False)["input_ids"])
    return list(tokenizer(prompt)["input_ids"])


def encode_pair(
    tokenizer: PreTrainedTokenizerBase,
    prompt: str,
    continuation: str,
    max_length: int,
    cut_continuation: bool = False,
) -> tuple[list[int], int]:
    """Token ids of `prompt + continuation` and the index where the continuation starts.

    The two parts are tokenised separately (the prompt with the tokenizer's default special tokens, the
    continuation without), as lm-evaluation-harness does: the continuation's tokens are then the same
    whatever precedes it, and the boundary between the parts is exact. A sequence longer than
    `max_length` loses prompt tokens from the left, since the end of the prompt matters most; with
    `cut_continuation` a continuation too long to leave half of `max_length` to the prompt is cut instead
    (otherwise it is an error).
    """
    prompt_tokens = prompt_ids(tokenizer, prompt)
    continuation_ids = list(tokenizer(continuation, add_special_tokens=False)["input_ids"])
    if not continuation_ids:
        raise ValueError(f"continuation {continuation!r} has no tokens")
    if not prompt_tokens:
        raise ValueError("the prompt has no tokens: nothing would predict the continuation's first token")
    if cut_continuation:
        # A long supplementary target (a worked solution) keeps its beginning and at least half of
        # max_length (or the whole prompt) stays for the prompt that conditions it.
        continuation_ids = continuation_ids[: max(1, max_length - min(len(prompt_tokens), max_length // 2))]
    # At least one prompt token must stay: it is the position that predicts the first continuation token.
    room = max_length - len(continuation_ids)
    if room < 1:
        raise ValueError(
            f"continuation of {len(continuation_ids)} tokens leaves no room for the prompt "
            f"within max_length={max_length}"
        )
    prompt_tokens = prompt_tokens[-room:]
    return prompt_tokens + continuation_ids, len(prompt_tokens)


@dataclass
class ContinuationBatch:
    """Right-padded sequences and, per row, the half-open span [start, end) of its continuation."""

    input_ids: Tensor  # (batch, length), long
    attention_mask: Tensor  # (batch, length), 1 on real tokens
    spans: list[tuple[int, int]]

    @property
    def num_continuation_tokens(self) -> int:
        return sum(end - start for start, end in self.spans)


def pad_right(sequences: Sequence[list[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """(input_ids, attention_mask) with right padding, so every row's positions start at 0."""
    length = max(len(ids) for ids in sequences)
    input_ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for row, ids in enumerate(sequences):
        input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, : len(ids)] = 1
    return input_ids, attention_mask


def collate_pairs(pairs: Sequence[tuple[list[int], int]], pad_id: int) -> ContinuationBatch:
    """Batch `encode_pair` outputs with right padding."""
    if not pairs:
        raise ValueError("cannot collate an empty list of pairs")
    for row, (ids, start) in enumerate(pairs):
        if not 0 < start < len(ids):
            raise ValueError(f"row {row}: continuation start {start} is outside (0, {len(ids)})")
    input_ids, attention_mask = pad_right([ids for ids, _ in pairs], pad_id)
    spans = [(start, len(ids)) for ids, start in pairs]
    return ContinuationBatch(input_ids=input_ids, attention_mask=attention_mask, spans=spans)


def as_causal_lm(model: nn.Module) -> PreTrainedModel:
    """`model` as the Hugging Face model it is or wraps (a peft wrapper forwards the methods used here)."""
    return cast(PreTrainedModel, model)


def model_device(model: nn.Module) -> torch.device:
    """Where the inputs go: the device of the first parameters, the input embeddings."""
    return next(model.parameters()).device


def last_hidden_states(model: nn.Module, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """The decoder's final hidden states (batch, length, hidden), without the LM head.

    `get_decoder()` is the bare transformer of a causal LM (and reaches through a peft wrapper).
    """
    device = model_device(model)
    output = as_causal_lm(model).get_decoder()(
        input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), use_cache=False
    )
    return output.last_hidden_state


def vocab_logprobs(model: nn.Module, hidden: Tensor) -> Tensor:
    """Log-softmax over the vocabulary for each row of `hidden` (n, hidden_size): the head on those only."""
    return as_causal_lm(model).get_output_embeddings()(hidden).float().log_softmax(dim=-1)


def continuation_logprobs(model: nn.Module, batch: ContinuationBatch) -> list[Tensor]:
    """Per row, the log-probability of each continuation token (differentiable).

    The LM head is a large share of a small model's cost (SmolLM2-135M: 28M of its 135M multiply-adds
    per position, plus a softmax over 49,152 entries), so it is applied only to the positions that
    predict a continuation token (position t-1 predicts token t) instead of to every position. This
    matches the full-logits computation for models whose head is a plain linear layer (Llama, Mistral,
    Qwen, SmolLM, ...).
    """
    hidden = last_hidden_states(model, batch.input_ids, batch.attention_mask)
    rows = torch.cat([torch.full((end - start,), row) for row, (start, end) in enumerate(batch.spans)])
    positions = torch.cat([torch.arange(start, end) for start, end in batch.spans])
    targets = batch.input_ids[rows, positions]
    selected = hidden[rows.to(hidden.device), (positions - 1).to(hidden.device)]
    logprobs = vocab_logprobs(model, selected).gather(-1, targets.to(selected.device)[:, None]).squeeze(-1)
    return list(logprobs.split([end - start for start, end in batch.spans]))


def continuation_loss(model: nn.Module, batch: ContinuationBatch) -> Tensor:
    """Mean negative log-likelihood over all continuation tokens of the batch (each token weighs the same)."""
    return -torch.cat(continuation_logprobs(model, batch)).mean()
