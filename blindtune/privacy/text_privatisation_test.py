import math

import pytest
import torch

from blindtune.models import load_tokenizer
from blindtune.privacy.text_privatisation import (
    SENSITIVITY,
    ExponentialMechanism,
    LikelihoodAttacker,
    PrivatisationConfig,
    PrivatisedPrompt,
    TokenRole,
    allocate_epsilons,
    privatise_prompts,
    recovery_attack,
    split_private,
    template_lines,
    token_role,
    vocabulary_candidates,
)


def random_mechanism(vocabulary: int = 16, dim: int = 8, seed: int = 0) -> ExponentialMechanism:
    return ExponentialMechanism(torch.randn(vocabulary, dim, generator=torch.Generator().manual_seed(seed)))


def chi_square_critical(degrees: int, z: float = 3.719) -> float:
    """Wilson-Hilferty approximation of the chi-square quantile; z = 3.719 is the 1 - 1e-4 normal quantile."""
    return degrees * (1 - 2 / (9 * degrees) + z * math.sqrt(2 / (9 * degrees))) ** 3


def chi_square(counts: torch.Tensor, probabilities: torch.Tensor) -> float:
    expected = probabilities * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


def test_sampling_frequencies_match_the_exponential_mechanism_formula():
    mechanism = random_mechanism()
    epsilon, source, draws = 6.0, 3, 40_000
    utility = mechanism.unit[source] @ mechanism.unit.T
    formula = torch.softmax(epsilon * utility / (2 * SENSITIVITY), dim=0)
    assert torch.allclose(mechanism.probabilities(source, epsilon), formula, atol=1e-6)
    samples = mechanism.sample(
        torch.full((draws,), source), torch.full((draws,), epsilon), torch.Generator().manual_seed(1)
    )
    counts = torch.bincount(samples, minlength=16).double()
    critical = chi_square_critical(degrees=15)
    assert chi_square(counts, formula.double()) < critical
    # The test has power: the same draws reject a mechanism that forgets the factor 2 of the EM.
    wrong = torch.softmax(epsilon * utility / SENSITIVITY, dim=0)
    assert chi_square(counts, wrong.double()) > critical


def test_epsilon_zero_is_uniform_and_epsilon_inf_is_the_identity():
    mechanism = random_mechanism()
    assert torch.allclose(mechanism.probabilities(5, 0.0), torch.full((16,), 1 / 16))
    draws = 32_000
    uniform = mechanism.sample(torch.full((draws,), 5), torch.zeros(draws), torch.Generator().manual_seed(2))
    counts = torch.bincount(uniform, minlength=16).double()
    assert chi_square(counts, torch.full((16,), 1 / 16, dtype=torch.float64)) < chi_square_critical(15)
    tokens = torch.arange(16)
    assert torch.equal(mechanism.sample(tokens, torch.full((16,), math.inf), torch.Generator()), tokens)
    # A large finite epsilon concentrates on the most similar token: the input itself.
    assert torch.equal(mechanism.sample(tokens, torch.full((16,), 1e6), torch.Generator().manual_seed(3)), tokens)


def test_only_candidates_are_output_and_bad_input_is_rejected():
    mechanism = ExponentialMechanism(torch.randn(10, 4), candidate_ids=[0, 2, 4])
    out = mechanism.sample(torch.arange(10), torch.zeros(10), torch.Generator().manual_seed(0))
    assert set(out.tolist()) <= {0, 2, 4}
    with pytest.raises(ValueError, match="NaN"):
        ExponentialMechanism(torch.tensor([[1.0, math.nan], [0.0, 1.0]]))
    with pytest.raises(ValueError, match="epsilons"):
        mechanism.sample(torch.arange(3), torch.tensor([1.0, -1.0, 1.0]), torch.Generator())
    with pytest.raises(ValueError, match="3 tokens but 2"):
        mechanism.sample(torch.arange(3), torch.ones(2), torch.Generator())
    with pytest.raises(ValueError, match="token ids"):
        mechanism.sample(torch.tensor([10]), torch.ones(1), torch.Generator())
    with pytest.raises(ValueError, match="epsilon"):
        PrivatisationConfig(epsilon=-1.0)


def test_adaptive_allocation_keeps_the_total_and_favours_structure():
    roles = [TokenRole.STRUCTURE, TokenRole.CONTENT, TokenRole.SENSITIVE, TokenRole.CONTENT, TokenRole.STRUCTURE]
    config = PrivatisationConfig(epsilon=3.0, adaptive=True)
    epsilons = allocate_epsilons(roles, config)
    assert math.isclose(math.fsum(epsilons), 3.0 * len(roles))
    assert epsilons[0] > epsilons[1] > epsilons[2] and epsilons[0] == epsilons[4]
    uniform = allocate_epsilons(roles, PrivatisationConfig(epsilon=3.0, adaptive=False))
    assert uniform == [3.0] * 5
    assert allocate_epsilons(roles, PrivatisationConfig(epsilon=math.inf)) == [math.inf] * 5


def test_token_roles():
    assert token_role(" the", starts_sentence=False) is TokenRole.STRUCTURE
    assert token_role(",", starts_sentence=False) is TokenRole.STRUCTURE
    assert token_role(" cat", starts_sentence=False) is TokenRole.CONTENT
    assert token_role(" Natalia", starts_sentence=False) is TokenRole.SENSITIVE
    assert token_role(" Natalia", starts_sentence=True) is TokenRole.CONTENT
    assert token_role(" 48", starts_sentence=True) is TokenRole.SENSITIVE


def test_template_lines_and_field_labels_stay_public():
    prompts = [f"Definition: thing number {i}\nCategory (one of: a, b):" for i in range(10)]
    template = template_lines(prompts, min_share=0.5)
    assert template == frozenset({"Category (one of: a, b):", "Definition:"})
    segments = split_private(prompts[0], template)
    assert "".join(text for text, _ in segments) == prompts[0]
    assert [text for text, private in segments if private] == [" thing number 0"]
    # A rare "Name:" at the start of a private line is content, not a field label.
    assert split_private("Natalia: sold clips", template) == [("Natalia: sold clips", True)]


def test_privatised_prompts_keep_the_template_and_account_every_token():
    tokenizer = load_tokenizer()
    mechanism = ExponentialMechanism(
        torch.randn(len(tokenizer), 16, generator=torch.Generator().manual_seed(0)),
        vocabulary_candidates(tokenizer, len(tokenizer)),
    )
    prompts = [f"Question: Natalia sold {n} clips to her friends in April.\nAnswer:" for n in (48, 12, 7)]
    template = template_lines(prompts, 0.5)
    config = PrivatisationConfig(epsilon=2.0)
    private = privatise_prompts(prompts, tokenizer, mechanism, config, template, seed=0)
    for prompt, result in zip(prompts, private, strict=True):
        assert result.text.startswith("Question:") and result.text.endswith("\nAnswer:")
        assert len(result.original_ids) == len(result.privatised_ids) == len(result.epsilons) > 5
        assert math.isclose(result.epsilon, 2.0 * len(result.original_ids))
        assert result.text != prompt
    attack = recovery_attack(mechanism, private, top_k=5)
    assert attack["tokens"] == sum(len(p.original_ids) for p in private)
    assert attack["recovery_rate"] < 0.5
    identity = privatise_prompts(prompts, tokenizer, mechanism, PrivatisationConfig(epsilon=math.inf), template, 0)
    assert [p.text for p in identity] == prompts
    assert recovery_attack(mechanism, identity, top_k=5)["recovery_rate"] == 1.0
    # Same seed, same draw: a client can reproduce what it sent.
    again = privatise_prompts(prompts, tokenizer, mechanism, config, template, seed=0)
    assert [p.text for p in again] == [p.text for p in private]


class FixedPrior(torch.nn.Module):
    """A language model that predicts the next token of one known text with log-odds `strength`."""

    def __init__(self, text: list[int], vocabulary: int, strength: float) -> None:
        super().__init__()
        self.text, self.vocabulary, self.strength = text, vocabulary, strength
        self.anchor = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids: torch.Tensor):
        logits = torch.zeros(1, input_ids.shape[1], self.vocabulary)
        for position in range(input_ids.shape[1] - 1):
            logits[0, position, self.text[position + 1]] = self.strength
        return type("Output", (), {"logits": logits})()


def test_the_likelihood_attacker_uses_the_mechanism_and_the_language_model_prior():
    vocabulary, length = 40, 200
    mechanism = random_mechanism(vocabulary, dim=6, seed=1)
    attacker = LikelihoodAttacker(mechanism, FixedPrior([], vocabulary, 0.0), candidates=vocabulary)
    sampled = LikelihoodAttacker(mechanism, attacker.model, normaliser_sample=30)  # 30 of 40 tokens
    for token, epsilon in ((3, 4.0), (17, 30.0)):  # the histogram normaliser matches the exact distribution
        exact = mechanism.probabilities(token, epsilon).log()
        estimated = attacker.log_likelihood(torch.tensor([token]), received=5, epsilon=epsilon)
        assert float(estimated[0]) == pytest.approx(float(exact[5]), abs=0.05)
        estimated = sampled.log_likelihood(torch.tensor([token]), received=5, epsilon=epsilon)
        assert float(estimated[0]) == pytest.approx(float(exact[5]), abs=0.3)

    original = torch.randint(0, vocabulary, (length,), generator=torch.Generator().manual_seed(2)).tolist()
    epsilons = [6.0] * length
    received = mechanism.sample(torch.tensor(original), torch.tensor(epsilons), torch.Generator().manual_seed(3))
    prompt = PrivatisedPrompt("", original, received.tolist(), epsilons, received.tolist(), list(range(length)))
    for strength, at_least in ((0.0, None), (2.0, 0.0), (30.0, 0.95)):
        model = FixedPrior(original, vocabulary, strength)
        result = LikelihoodAttacker(mechanism, model, candidates=8, passes=1).attack([prompt])
        if at_least is None:  # no prior: the best guess is the received token's most likely origin
            baseline = result["lm_recovery_rate"]
            assert result["unchanged_rate"] < 0.5 and result["tokens"] == length
        else:
            assert result["lm_recovery_rate"] >= max(at_least, baseline)
    assert result["lm_recovery_rate"] > result["unchanged_rate"]
