"""Tokenise (prompt, continuation) pairs and score continuations; shared by training and evaluation.

Training minimises the loss of `Example.target` given `Example.prompt`, and evaluation compares the
log-likelihoods of `Example.choices`: both go through these functions, so a continuation is tokenised
and scored the same way whether it is learnt or measured.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
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


def last_hidden_states(
    model: nn.Module, input_ids: Tensor, attention_mask: Tensor | None, position_ids: Tensor | None = None
) -> Tensor:
    """The decoder's final hidden states (batch, length, hidden), without the LM head.

    `get_decoder()` is the bare transformer of a causal LM (and reaches through a peft wrapper).
    `attention_mask`: 2D (padding) or 4D (who attends to whom); `position_ids`: given where they do not
    simply count from 0 in each row.
    """
    device = model_device(model)
    output = as_causal_lm(model).get_decoder()(
        input_ids=input_ids.to(device),
        attention_mask=None if attention_mask is None else attention_mask.to(device),
        position_ids=None if position_ids is None else position_ids.to(device),
        use_cache=False,
    )
    return output.last_hidden_state


def vocab_logprobs(model: nn.Module, hidden: Tensor) -> Tensor:
    """Log-softmax over the vocabulary for each row of `hidden` (n, hidden_size): the head on those only."""
    return as_causal_lm(model).get_output_embeddings()(hidden).float().log_softmax(dim=-1)


def packed_hidden_states(model: nn.Module, sequences: Sequence[Tensor]) -> Tensor:
    """The decoder's final hidden states (total length, hidden) of `sequences` concatenated in one row,
    each with position ids from 0: transformers then masks attention to each sequence's own block, so
    no position is spent on padding. Only valid where `packs_sequences(model)`."""
    input_ids = torch.cat(list(sequences))[None]
    position_ids = torch.cat([torch.arange(len(ids)) for ids in sequences])[None]
    return last_hidden_states(model, input_ids, None, position_ids)[0]


def _agree(got: Tensor, expected: Tensor) -> bool:
    """Equal up to the rounding of a different computation order (looser in half precision); a layout
    the model does not honour moves values by far more."""
    tolerance = 1e-3 if got.dtype == torch.float32 else 5e-2
    return torch.allclose(got.float(), expected.float(), rtol=tolerance, atol=tolerance)


def _honoured(
    checked: weakref.WeakKeyDictionary[nn.Module, bool], model: nn.Module, agreement: Callable[[], bool]
) -> bool:
    """Whether `model` honours a faster layout: `agreement()` compares it with the plain one on a few
    tokens, once per model, without dropout or gradients. A model that fails on the layout does not."""
    if model not in checked:
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                checked[model] = agreement()
        except (TypeError, ValueError, RuntimeError, IndexError):
            checked[model] = False
        finally:
            model.train(was_training)
    return checked[model]


_packing_checked: weakref.WeakKeyDictionary[nn.Module, bool] = weakref.WeakKeyDictionary()


def packs_sequences(model: nn.Module) -> bool:
    """Whether `model` keeps packed sequences apart (`packed_hidden_states` equals the padded batch): a
    decoder that builds its own mask (a soft prompt in front of the row) or ignores restarting position
    ids would let the sequences attend to each other."""

    def agreement() -> bool:
        first, second = torch.arange(1, 6), torch.arange(6, 9)
        padded = last_hidden_states(model, *pad_right([first.tolist(), second.tolist()], pad_id=0))
        packed = packed_hidden_states(model, [first, second])
        expected = torch.cat([padded[0, : len(first)], padded[1, : len(second)]])
        return packed.shape == expected.shape and _agree(packed, expected)

    return _honoured(_packing_checked, model, agreement)


def shared_prompt_logprobs(
    model: nn.Module, prompts: Sequence[list[int]], options: Sequence[Sequence[list[int]]]
) -> list[list[Tensor]]:
    """Per prompt and option, the log-probability of each of the option's tokens given the prompt.

    Each prompt runs once for all its options: a row holds the prompt, then every option at the
    positions it would have right after the prompt, each option attending to the prompt and to itself
    only (a 4D attention mask). Multiple-choice options are short next to their prompt, so this costs a
    fraction of scoring every (prompt + option) sequence. Only valid where `shares_prompts(model)`.
    """
    rows, segments, position_rows = [], [], []
    for prompt, choices in zip(prompts, options, strict=True):
        rows.append([*prompt, *(token for choice in choices for token in choice)])
        segments.append([0] * len(prompt) + [k + 1 for k, choice in enumerate(choices) for _ in choice])
        position_rows.append(
            [*range(len(prompt)), *(len(prompt) + t for choice in choices for t in range(len(choice)))]
        )
    length = max(len(row) for row in rows)
    input_ids = torch.zeros((len(rows), length), dtype=torch.long)
    position_ids = torch.zeros((len(rows), length), dtype=torch.long)
    segment = torch.full((len(rows), length), -1)  # padding: its own segment, attending to itself only
    for index, (row, row_segments, positions) in enumerate(zip(rows, segments, position_rows, strict=True)):
        input_ids[index, : len(row)] = torch.tensor(row)
        position_ids[index, : len(row)] = torch.tensor(positions)
        segment[index, : len(row)] = torch.tensor(row_segments)
    query, key = segment[:, :, None], segment[:, None, :]
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    allowed = causal & ((key == 0) & (query >= 0) | (key == query))
    allowed |= torch.eye(length, dtype=torch.bool)
    dtype = as_causal_lm(model).get_input_embeddings().weight.dtype
    mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)[:, None]
    hidden = last_hidden_states(model, input_ids, mask, position_ids)
    # Token t of an option is predicted at the prompt's last position (t = 0) or at the option's token t - 1.
    row_of, predictor, targets, sizes = [], [], [], []
    for index, (prompt, choices) in enumerate(zip(prompts, options, strict=True)):
        start = len(prompt)
        for choice in choices:
            row_of += [index] * len(choice)
            predictor += [len(prompt) - 1, *range(start, start + len(choice) - 1)]
            targets += choice
            sizes.append(len(choice))
            start += len(choice)
    selected = hidden[torch.tensor(row_of, device=hidden.device), torch.tensor(predictor, device=hidden.device)]
    logprobs = vocab_logprobs(model, selected).gather(-1, torch.tensor(targets, device=selected.device)[:, None])
    split = list(logprobs.squeeze(-1).split(sizes))
    result, used = [], 0
    for choices in options:
        result.append(split[used : used + len(choices)])
        used += len(choices)
    return result


_prompt_sharing_checked: weakref.WeakKeyDictionary[nn.Module, bool] = weakref.WeakKeyDictionary()


def shares_prompts(model: nn.Module) -> bool:
    """Whether `model` takes `shared_prompt_logprobs`' 4D mask and position ids as given (the same
    scores as each (prompt + option) sequence on its own): a soft prompt in front of the row, or a
    decoder that rebuilds its own mask, would not."""

    def agreement() -> bool:
        prompt, choices = [1, 2, 3], [[4, 5], [6], [7, 8, 9]]
        shared = shared_prompt_logprobs(model, [prompt], [choices])[0]
        pairs = [([*prompt, *choice], len(prompt)) for choice in choices]
        alone = continuation_logprobs(model, collate_pairs(pairs, pad_id=0))
        return all(_agree(a, b) for a, b in zip(shared, alone, strict=True))

    return _honoured(_prompt_sharing_checked, model, agreement)


def continuation_logprobs(model: nn.Module, batch: ContinuationBatch, *, packed: bool = False) -> list[Tensor]:
    """Per row, the log-probability of each continuation token (differentiable).

    The LM head is a large share of a small model's cost (SmolLM2-135M: 28M of its 135M multiply-adds
    per position, plus a softmax over 49,152 entries), so it is applied only to the positions that
    predict a continuation token (position t-1 predicts token t) instead of to every position. This
    matches the full-logits computation for models whose head is a plain linear layer (Llama, Mistral,
    Qwen, SmolLM, ...).

    `packed`: run the rows concatenated without their padding (a quarter of a training batch's positions
    on the demo task) where the model supports it (`packs_sequences`); the same values up to float
    rounding. Not for per-example gradients (DP-SGD), which need one row per example.
    """
    spans = batch.spans
    if packed and packs_sequences(model):
        # Right padding: row r's tokens are input_ids[r, :end]; in the packed row they start at offsets[r].
        lengths = [end for _, end in spans]
        hidden = packed_hidden_states(model, [batch.input_ids[row, :end] for row, end in enumerate(lengths)])
        offsets = torch.tensor([0, *lengths[:-1]]).cumsum(0)
        positions = torch.cat([offsets[row] + torch.arange(start, end) for row, (start, end) in enumerate(spans)])
        targets = torch.cat([batch.input_ids[row, start:end] for row, (start, end) in enumerate(spans)])
        selected = hidden[(positions - 1).to(hidden.device)]
    else:
        hidden = last_hidden_states(model, batch.input_ids, batch.attention_mask)
        rows = torch.cat([torch.full((end - start,), row) for row, (start, end) in enumerate(spans)])
        positions = torch.cat([torch.arange(start, end) for start, end in spans])
        targets = batch.input_ids[rows, positions]
        selected = hidden[rows.to(hidden.device), (positions - 1).to(hidden.device)]
    logprobs = vocab_logprobs(model, selected).gather(-1, targets.to(selected.device)[:, None]).squeeze(-1)
    return list(logprobs.split([end - start for start, end in spans]))


def continuation_loss(model: nn.Module, batch: ContinuationBatch, *, packed: bool = False) -> Tensor:
    """Mean negative log-likelihood over all continuation tokens of the batch (each token weighs the same)."""
    return -torch.cat(continuation_logprobs(model, batch, packed=packed)).mean()
