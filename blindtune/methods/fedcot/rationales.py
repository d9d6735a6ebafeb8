"""FedCoT's texts: what the server LLM is asked per task, how its rationale is cut and read, and the
two training examples (label, rationale) a client builds from one of its own examples."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence

from torch import nn
from transformers import PreTrainedTokenizerBase

from blindtune.data import Example, TaskData, TaskKind, extract_final_number
from blindtune.eval.generation import generate_texts
from blindtune.methods.fedcot.config import FedCoTConfig

# What the server LLM is asked about a privatised prompt, by task; `{prompt}` is the privatised prompt.
SUPERSENSE_TEMPLATE = (
    "{prompt}\nExplain in one or two sentences which category the definition belongs to, "
    "then name the category.\nExplanation:"
)
TASK_TEMPLATES = {
    "wordnet-supersense": SUPERSENSE_TEMPLATE,
    "wordnet-verb-supersense": SUPERSENSE_TEMPLATE,
    "gsm8k": "{prompt} Let's think step by step.",
}
DEFAULT_TEMPLATES = {
    TaskKind.MULTIPLE_CHOICE: "{prompt}\nExplain step by step which option is right, then name it.\nExplanation:",
    TaskKind.GENERATION: "{prompt} Let's think step by step.",
}
# A model that finishes its explanation often starts another example: cut there.
_NEXT_EXAMPLE = re.compile(r"\n\s*\n|\n(?:Definition|Question|Category|Explanation):")


def rationale_template(config: FedCoTConfig, task: TaskData) -> str:
    return config.rationale_template or TASK_TEMPLATES.get(task.name) or DEFAULT_TEMPLATES[task.kind]


def clean_rationale(generated: str) -> str:
    """The generated explanation up to where the model moves on to something else."""
    return _NEXT_EXAMPLE.split(generated, maxsplit=1)[0].strip()


def generate_rationales(
    llm: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    template: str,
    config: FedCoTConfig,
    progress: bool = False,
    desc: str = "rationales",
) -> list[str]:
    """The LLM's rationale for each prompt (batched greedy generation); empty when it produced none."""
    generated = generate_texts(
        llm,
        tokenizer,
        [template.replace("{prompt}", prompt) for prompt in prompts],
        max_new_tokens=config.max_new_tokens,
        batch_size=config.generation_batch_size,
        progress=progress,
        desc=desc,
    )
    return [clean_rationale(text) for text in generated]


def oracle_rationale(example: Example) -> str:
    """A generation example's gold worked solution without its final `#### answer` line."""
    if example.answer is None:
        raise ValueError("oracle rationales need a generation task with worked solutions (e.g. gsm8k)")
    steps, marker, _ = example.target.rpartition("####")
    return (steps if marker else example.target).strip()


def rationale_answer(rationale: str, example: Example) -> str | int | None:
    """The answer a rationale arrives at: the last option it names, or its final number."""
    if example.answer is not None:
        return extract_final_number(rationale)
    named = {
        match.start(): index
        for index, choice in enumerate(example.choices)
        for match in re.finditer(rf"(?<!\w){re.escape(choice.strip())}(?!\w)", rationale, flags=re.IGNORECASE)
    }
    return named[max(named)] if named else None


def agrees_with_gold(rationale: str, example: Example) -> bool:
    gold = example.answer if example.answer is not None else example.label
    return rationale_answer(rationale, example) == gold


def label_example(example: Example, config: FedCoTConfig, end_of_text: str = "") -> Example:
    """The label output: the option (multiple choice), or only the final answer (generation) followed by
    `end_of_text` (the tokenizer's end token), so the trained SLM stops after its answer."""
    target = example.target if example.answer is None else f" #### {example.answer}{end_of_text}"
    return dataclasses.replace(example, prompt=config.label_prefix + example.prompt, target=target)


def rationale_example(example: Example, rationale: str, config: FedCoTConfig) -> Example:
    return Example(prompt=config.rationale_prefix + example.prompt, target=" " + rationale)


def rationale_examples(
    examples: Sequence[Example], rationales: Sequence[str], config: FedCoTConfig
) -> tuple[list[Example], int]:
    """Rationale training examples (empty rationales, and with `filter_rationales` those whose answer
    disagrees with the gold label, are dropped) and how many were dropped."""
    if len(examples) != len(rationales):
        raise ValueError(f"{len(rationales)} rationales for {len(examples)} examples")
    kept = [
        rationale_example(example, rationale, config)
        for example, rationale in zip(examples, rationales, strict=True)
        if rationale and (not config.filter_rationales or agrees_with_gold(rationale, example))
    ]
    return kept, len(examples) - len(kept)


def label_task(task: TaskData, config: FedCoTConfig) -> TaskData:
    """The task as the trained SLM is asked it: label prompts (with the label prefix) on the test split."""
    return dataclasses.replace(task, test=[label_example(example, config) for example in task.test])
