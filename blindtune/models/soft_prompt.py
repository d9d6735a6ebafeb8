"""Soft prompts: a few trainable virtual tokens prepended to a causal LM's input embeddings.

A soft prompt is a (length, hidden) tensor placed before the embeddings of every input sequence. It is
the smallest adapter a client can train (LLEOT uses 5 tokens: 5 x 576 floats for SmolLM2-135M) and
plugging it in means prepending the same vectors to the LLM's inputs.

`SoftPromptModel` wraps a causal LM so the rest of the package needs no change: its `get_decoder()`
prepends the prompt (and extends the attention mask), runs the real decoder on `inputs_embeds` and
drops the prompt positions from `last_hidden_state`, so training (`encoding.continuation_loss`) and
evaluation (`eval.scoring`) see the usual (batch, length, hidden) states of the text positions only.

Specified behaviour:
- a zero-length prompt leaves the model's outputs unchanged;
- an untrained prompt, initialised from the embeddings of real tokens, gives exactly the outputs of
  the model reading those tokens before the text (the prompt is then ordinary text).

`run_with_prompt` is the functional core, also used with random proxy prompts (LLEOT's P').
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

SOFT_PROMPT_NAME = "soft_prompt.embeddings"  # the canonical (portable) name of the prompt in an adapter state


def run_with_prompt(
    decoder: nn.Module,
    embeddings: nn.Module,
    prompt: Tensor | None,
    input_ids: Tensor,
    attention_mask: Tensor | None = None,
    **kwargs: Any,
) -> BaseModelOutputWithPast:
    """Run `decoder` on `prompt` + the embeddings of `input_ids`; return the text positions only.

    prompt: (length, hidden), shared by all rows, or (batch, length, hidden), one per row; None or a
    zero-length prompt runs the decoder unchanged. Rows are right-padded as elsewhere in the package;
    the prompt positions are always attended to.
    """
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if prompt is None or prompt.shape[-2] == 0:
        return decoder(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
    text = embeddings(input_ids)
    if prompt.dim() == 2:
        prompt = prompt.unsqueeze(0).expand(text.shape[0], -1, -1)
    if prompt.shape[0] != text.shape[0] or prompt.shape[-1] != text.shape[-1]:
        raise ValueError(f"prompt of shape {tuple(prompt.shape)} does not fit inputs of shape {tuple(text.shape)}")
    length = prompt.shape[1]
    inputs_embeds = torch.cat([prompt.to(text.dtype), text], dim=1)
    mask = torch.cat([attention_mask.new_ones((text.shape[0], length)), attention_mask], dim=1)
    output = decoder(inputs_embeds=inputs_embeds, attention_mask=mask, **kwargs)
    # No cache is returned: it would hold the prompt's positions, which a later step would prepend again.
    return BaseModelOutputWithPast(last_hidden_state=output.last_hidden_state[:, length:])


class SoftPrompt(nn.Module):
    """The trainable prompt vectors, as parameter `embeddings` of shape (length, hidden)."""

    def __init__(self, embeddings: Tensor) -> None:
        super().__init__()
        self.embeddings = nn.Parameter(embeddings.detach().clone())

    @property
    def length(self) -> int:
        return int(self.embeddings.shape[0])


class PromptedDecoder(nn.Module):
    """What `SoftPromptModel.get_decoder()` returns: the real decoder with the prompt in front."""

    _decoder: nn.Module
    _embeddings: nn.Module
    _prompt: SoftPrompt

    def __init__(self, decoder: nn.Module, embeddings: nn.Module, prompt: SoftPrompt) -> None:
        super().__init__()
        # Plain attributes: the wrapped modules stay owned (and named) by the SoftPromptModel.
        object.__setattr__(self, "_decoder", decoder)
        object.__setattr__(self, "_embeddings", embeddings)
        object.__setattr__(self, "_prompt", prompt)

    @property
    def layers(self) -> nn.ModuleList:
        layers: nn.ModuleList = self._decoder.get_submodule("layers")  # type: ignore[assignment]
        return layers

    def forward(
        self, input_ids: Tensor, attention_mask: Tensor | None = None, **kwargs: Any
    ) -> BaseModelOutputWithPast:
        return run_with_prompt(
            self._decoder, self._embeddings, self._prompt.embeddings, input_ids, attention_mask, **kwargs
        )


class SoftPromptModel(nn.Module):
    """A causal LM with a soft prompt before every input; only `soft_prompt.embeddings` is new.

    `prompt`: the initial prompt vectors (length, hidden); None draws `length` real tokens (with the
    torch RNG, so seed it) and uses their input embeddings.
    """

    model: Any  # the wrapped causal LM (a PreTrainedModel, or a peft model around one)

    def __init__(self, model: nn.Module, length: int = 5, prompt: Tensor | None = None) -> None:
        super().__init__()
        self.model = model
        if prompt is None:
            prompt = initial_prompt(model, length)
        self.soft_prompt = SoftPrompt(prompt)

    @property
    def config(self) -> Any:
        return self.model.config

    def get_decoder(self) -> PromptedDecoder:
        return PromptedDecoder(self.model.get_decoder(), self.model.get_input_embeddings(), self.soft_prompt)

    def get_input_embeddings(self) -> nn.Module:
        return self.model.get_input_embeddings()

    def get_output_embeddings(self) -> nn.Module:
        return self.model.get_output_embeddings()

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, **kwargs: Any) -> CausalLMOutputWithPast:
        """Logits at the text positions (the prompt positions predict nothing of the text)."""
        hidden = self.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, **kwargs).last_hidden_state
        return CausalLMOutputWithPast(logits=self.get_output_embeddings()(hidden))

    def generate(self, input_ids: Tensor, attention_mask: Tensor | None = None, **kwargs: Any) -> Tensor:
        """Greedy/sampled generation with the prompt in front; returns input_ids + new tokens, like HF."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        text = self.get_input_embeddings()(input_ids)
        prompt = self.soft_prompt.embeddings.unsqueeze(0).expand(text.shape[0], -1, -1).to(text.dtype)
        mask = torch.cat([attention_mask.new_ones(prompt.shape[:2]), attention_mask], dim=1)
        generator: Any = self.model
        new_tokens = generator.generate(inputs_embeds=torch.cat([prompt, text], dim=1), attention_mask=mask, **kwargs)
        return torch.cat([input_ids, new_tokens.to(input_ids.device)], dim=1)


def initial_prompt(model: nn.Module, length: int) -> Tensor:
    """The input embeddings of `length` tokens drawn uniformly from the vocabulary (torch RNG)."""
    if length < 0:
        raise ValueError(f"a soft prompt has a length >= 0, got {length}")
    table = model.get_input_embeddings().weight  # type: ignore[operator]
    ids = torch.randint(0, table.shape[0], (length,))
    return table[ids.to(table.device)].detach().clone()


def prompt_from_tokens(model: nn.Module, token_ids: list[int]) -> Tensor:
    """The input embeddings of the given tokens: a prompt equivalent to that text."""
    table = model.get_input_embeddings().weight  # type: ignore[operator]
    return table[torch.tensor(token_ids, dtype=torch.long, device=table.device)].detach().clone()
