"""Evaluation: multiple-choice accuracy by option log-likelihood, perplexity, generation exact match."""

from blindtune.eval.scoring import (
    ChoiceEval,
    GenerationEval,
    evaluate_choices,
    evaluate_generation,
    perplexity,
)

__all__ = ["ChoiceEval", "GenerationEval", "evaluate_choices", "evaluate_generation", "perplexity"]
