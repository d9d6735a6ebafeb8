"""Token-level text privatisation with the exponential mechanism (EM), its exact budget accounting, an
adaptive allocation of the budget, and two recovery attacks on privatised text: nearest-neighbour
inversion (the share of tokens left unchanged) and `LikelihoodAttacker`, the mechanism's likelihood
combined with a language-model prior (the server holds an LLM).

Mechanism. Each private token x is replaced by a token y drawn with

    P(y | x) = exp(epsilon * u(x, y) / (2 * SENSITIVITY)) / sum_z exp(epsilon * u(x, z) / (2 * SENSITIVITY))

over the candidate vocabulary (every token but the tokenizer's special ones), u being the cosine
similarity of the two tokens' input embeddings (an embedding table the client holds). Cosine lies in
[-1, 1], so the utility's sensitivity is its range, SENSITIVITY = 2, and each replacement is epsilon-DP
(McSherry & Talwar, 2007). Sampling is Gumbel-max on those logits, vectorised over tokens and the whole
vocabulary. epsilon = inf is the identity, epsilon = 0 the uniform distribution.

Accounting (basic composition). A prompt's private tokens get epsilons e_1..e_n; the prompt is
(e_1 + ... + e_n)-DP for any other prompt with as many private tokens: every factor P(y_i | x_i) lies
within exp(+-e_i / 2) / |V|, whatever e_i the allocation chose for x_i. Nothing else is spent: the
public template (lines shared by many of the client's prompts, and short field labels such as
"Question:") is sent as is, since it is the same for every example.

Adaptive allocation (same total). The uniform mechanism gives every private token `epsilon`, so a
prompt of n private tokens spends n * epsilon. The adaptive one spends the same n * epsilon, shared in
proportion to a weight per token role:
- structure (whitespace, punctuation, stop-words): `structure_weight` (default 2): these carry the
  sentence's shape that the server LLM needs to reason, and little of what makes a text private;
- content (every other word piece): `content_weight` (default 1);
- sensitive (pieces with digits, capitalised pieces not starting a sentence: numbers and names):
  `sensitive_weight` (default 0.5): the most noise.
e_i = n * epsilon * w_i / sum_j w_j. The prompt-level guarantee stays n * epsilon; a single token is
e_i-DP against replacements of the same role (the role decides its share).
"""

from __future__ import annotations

import enum
import math
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor
from transformers import PreTrainedTokenizerBase

SENSITIVITY = 2.0  # range of the cosine utility, [-1, 1]
# A line of the form "Field: value" with a short field name: the field name is template.
_FIELD_LABEL = re.compile(r"^(\s*[A-Za-z][\w ]{0,19}:)(.*)$")
_SENTENCE_END = re.compile(r"[.!?:\n]\s*$")
STOP_WORDS = frozenset(
    """
    a an the and or but if then else of to in on at by for with from as is are was were be been being it its
    this that these those there here which who whom whose what when where why how not no nor so than too very
    can could will would shall should may might must do does did has have had having i you he she we they me
    him her us them my your his our their up down out over under again further once all any both each few more
    most other some such only own same just into through during before after above below between about against
    per
    """.split()  # noqa: SIM905 (a word list reads better as text)
)


class TokenRole(enum.IntEnum):
    STRUCTURE = 0
    CONTENT = 1
    SENSITIVE = 2


@dataclass
class PrivatisationConfig:
    """How a client privatises its prompts before any text leaves it.

    epsilon: the budget per private token (math.inf / `.inf` in YAML: no privatisation, the identity;
        0: every token replaced uniformly at random). A prompt of n private tokens spends n * epsilon.
    adaptive: share each prompt's n * epsilon unevenly by token role (see the module docstring);
        False gives every private token exactly epsilon.
    structure_weight / content_weight / sensitive_weight: the adaptive rule's share of each role.
    template_share: a prompt line found in at least this share of the client's prompts (and in at least
        two) is the task's public template and is sent unchanged.
    attack_top_k: the recovery attack also counts an original token as recovered when it is among the
        k nearest neighbours of the privatised token.
    """

    epsilon: float = 10.0
    adaptive: bool = True
    structure_weight: float = 2.0
    content_weight: float = 1.0
    sensitive_weight: float = 0.5
    template_share: float = 0.05
    attack_top_k: int = 10

    def __post_init__(self) -> None:
        if math.isnan(self.epsilon) or self.epsilon < 0:
            raise ValueError(f"privatisation epsilon must be >= 0 (or inf), got {self.epsilon}")
        weights = (self.structure_weight, self.content_weight, self.sensitive_weight)
        if not all(math.isfinite(w) and w > 0 for w in weights):
            raise ValueError(f"role weights must be finite and > 0, got {weights}")
        if not 0 < self.template_share <= 1:
            raise ValueError(f"template_share must be in (0, 1], got {self.template_share}")
        if self.attack_top_k < 1:
            raise ValueError(f"attack_top_k must be >= 1, got {self.attack_top_k}")

    def role_weight(self, role: TokenRole) -> float:
        return (self.structure_weight, self.content_weight, self.sensitive_weight)[role]


class ExponentialMechanism:
    """The EM over a vocabulary, with cosine similarity of `embeddings` rows as the utility.

    candidate_ids: the tokens that may be output (default: every row); the utility range, hence the
    sensitivity, does not depend on them.
    """

    def __init__(self, embeddings: Tensor, candidate_ids: Sequence[int] | Tensor | None = None) -> None:
        if embeddings.dim() != 2 or embeddings.shape[0] < 2:
            raise ValueError(
                f"embeddings must be a (vocabulary, dim) matrix with >= 2 rows, got {tuple(embeddings.shape)}"
            )
        table = embeddings.detach().to("cpu", torch.float32)
        if not torch.isfinite(table).all():
            raise ValueError("embeddings hold NaN or Inf values")
        self.unit = table / table.norm(dim=1, keepdim=True).clamp_min(1e-12)
        size = table.shape[0]
        ids = torch.arange(size) if candidate_ids is None else torch.as_tensor(candidate_ids, dtype=torch.long)
        if ids.numel() == 0 or int(ids.min()) < 0 or int(ids.max()) >= size:
            raise ValueError(f"candidate ids must be a non-empty subset of 0..{size - 1}")
        self.candidate_mask = torch.zeros(size, dtype=torch.bool)
        self.candidate_mask[ids] = True

    @property
    def vocabulary_size(self) -> int:
        return int(self.unit.shape[0])

    def _check_ids(self, token_ids: Tensor) -> None:
        if token_ids.numel() and (int(token_ids.min()) < 0 or int(token_ids.max()) >= self.vocabulary_size):
            raise ValueError(f"token ids must lie in 0..{self.vocabulary_size - 1}")

    def utilities(self, token_ids: Tensor) -> Tensor:
        """u(x, y) for each x in `token_ids` and every y: (n, vocabulary), in [-1, 1]."""
        self._check_ids(token_ids)
        return (self.unit[token_ids] @ self.unit.T).clamp(-1.0, 1.0)

    def logits(self, token_ids: Tensor, epsilons: Tensor) -> Tensor:
        """epsilon * u / (2 * SENSITIVITY), -inf outside the candidates; rows with epsilon = inf are not allowed."""
        if not torch.isfinite(epsilons).all():
            raise ValueError("logits need finite epsilons (epsilon = inf is the identity, not a distribution)")
        logits = epsilons[:, None] * self.utilities(token_ids) / (2 * SENSITIVITY)
        return logits.masked_fill(~self.candidate_mask, -math.inf)

    def probabilities(self, token_id: int, epsilon: float) -> Tensor:
        """The mechanism's output distribution for one token (for tests and attacks)."""
        return self.logits(torch.tensor([token_id]), torch.tensor([float(epsilon)])).softmax(dim=-1)[0]

    def sample(self, token_ids: Tensor, epsilons: Tensor, generator: torch.Generator, chunk: int = 256) -> Tensor:
        """One draw per token (Gumbel-max on the logits); tokens with epsilon = inf are kept."""
        token_ids = torch.as_tensor(token_ids, dtype=torch.long).reshape(-1)
        epsilons = torch.as_tensor(epsilons, dtype=torch.float32).reshape(-1)
        if token_ids.shape != epsilons.shape:
            raise ValueError(f"{token_ids.numel()} tokens but {epsilons.numel()} epsilons")
        if torch.isnan(epsilons).any() or (epsilons < 0).any():
            raise ValueError("epsilons must be >= 0 (or inf)")
        self._check_ids(token_ids)
        output = token_ids.clone()
        noisy = torch.nonzero(torch.isfinite(epsilons)).squeeze(-1)
        for start in range(0, noisy.numel(), chunk):
            rows = noisy[start : start + chunk]
            logits = self.logits(token_ids[rows], epsilons[rows])
            uniform = torch.rand(logits.shape, generator=generator).clamp_(1e-20, 1.0)
            output[rows] = (logits - torch.log(-torch.log(uniform))).argmax(dim=-1)
        return output

    def nearest_neighbours(self, token_ids: Tensor, k: int, chunk: int = 256) -> Tensor:
        """The k candidates most similar to each token (the token itself first when it is a candidate)."""
        rows = []
        for start in range(0, token_ids.numel(), chunk):
            similar = self.utilities(token_ids[start : start + chunk]).masked_fill(~self.candidate_mask, -math.inf)
            rows.append(similar.topk(min(k, int(self.candidate_mask.sum())), dim=-1).indices)
        return torch.cat(rows) if rows else torch.empty((0, k), dtype=torch.long)


def token_role(text: str, starts_sentence: bool) -> TokenRole:
    """The role of one decoded token (see the module docstring)."""
    word = text.strip()
    if not word or not any(c.isalnum() for c in word) or word.lower() in STOP_WORDS:
        return TokenRole.STRUCTURE
    if any(c.isdigit() for c in word) or (word[0].isupper() and not starts_sentence):
        return TokenRole.SENSITIVE
    return TokenRole.CONTENT


def allocate_epsilons(roles: Sequence[TokenRole], config: PrivatisationConfig) -> list[float]:
    """Per-token epsilons of one prompt: `epsilon` each, or the same total n * epsilon shared by role."""
    if not config.adaptive or not math.isfinite(config.epsilon):
        return [config.epsilon] * len(roles)
    weights = [config.role_weight(role) for role in roles]
    total = config.epsilon * len(roles)
    return [total * weight / sum(weights) for weight in weights]


def template_lines(prompts: Sequence[str], min_share: float) -> frozenset[str]:
    """The public template: lines, and field labels ("Question:"), found in at least `min_share` of the
    prompts (and in two at least). A label is public only when it is frequent, so a private line that
    happens to start with "Name:" keeps its name private."""
    counts: Counter[str] = Counter()
    for prompt in prompts:
        lines = {line.strip() for line in prompt.splitlines() if line.strip()}
        labels = {match.group(1).strip() for line in lines if (match := _FIELD_LABEL.match(line))}
        counts.update(lines | labels)
    limit = max(2, math.ceil(min_share * len(prompts)))
    return frozenset(text for text, count in counts.items() if count >= limit)


def split_private(prompt: str, template: frozenset[str]) -> list[tuple[str, bool]]:
    """The prompt as consecutive (text, is_private) segments; joined, they give the prompt back."""
    segments: list[tuple[str, bool]] = []
    for index, line in enumerate(prompt.split("\n")):
        if index:
            segments.append(("\n", False))
        match = _FIELD_LABEL.match(line)
        if not line.strip() or line.strip() in template:
            segments.append((line, False))
        elif match and match.group(1).strip() in template and match.group(2).strip():
            segments += [(match.group(1), False), (match.group(2), True)]
        else:
            segments.append((line, True))
    return segments


@dataclass
class PrivatisedPrompt:
    """One prompt after privatisation: the text that may leave the client, and its accounting."""

    text: str
    original_ids: list[int]  # the private tokens before ...
    privatised_ids: list[int]  # ... and after the mechanism
    epsilons: list[float]  # per private token
    sequence_ids: list[int] = field(default_factory=list)  # the whole prompt as sent: template + privatised
    private_positions: list[int] = field(default_factory=list)  # where the private tokens sit in it

    @property
    def epsilon(self) -> float:
        """The prompt's budget by basic composition."""
        return math.fsum(self.epsilons)


def privatise_prompts(
    prompts: Sequence[str],
    tokenizer: PreTrainedTokenizerBase,
    mechanism: ExponentialMechanism,
    config: PrivatisationConfig,
    template: frozenset[str],
    seed: int,
) -> list[PrivatisedPrompt]:
    """Privatise every prompt's private segments token by token (all tokens in one vectorised pass)."""
    # Per prompt: its segments (text, and the token ids of a private one) and its first token's offset.
    plans: list[tuple[list[tuple[str, list[int] | None]], int, list[float]]] = []
    all_ids: list[int] = []
    all_epsilons: list[float] = []
    for prompt in prompts:
        segments: list[tuple[str, list[int] | None]] = []
        roles: list[TokenRole] = []
        for text, private in split_private(prompt, template):
            ids: list[int] = list(tokenizer(text, add_special_tokens=False)["input_ids"]) if private else []
            starts = True
            for token_id in ids:
                piece = str(tokenizer.decode([token_id]))
                roles.append(token_role(piece, starts))
                starts = bool(_SENTENCE_END.search(piece))
            segments.append((text, ids if private else None))
        epsilons = allocate_epsilons(roles, config)
        plans.append((segments, len(all_ids), epsilons))
        all_ids += [token_id for _, ids in segments if ids for token_id in ids]
        all_epsilons += epsilons
    generator = torch.Generator().manual_seed(seed)
    sampled = mechanism.sample(torch.tensor(all_ids, dtype=torch.long), torch.tensor(all_epsilons), generator).tolist()
    results = []
    for segments, offset, epsilons in plans:
        parts = []
        sequence: list[int] = []
        positions: list[int] = []
        position = offset
        for text, segment_ids in segments:
            if segment_ids is None:
                parts.append(text)
                sequence += list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []
            else:
                parts.append(str(tokenizer.decode(sampled[position : position + len(segment_ids)])))
                positions += range(len(sequence), len(sequence) + len(segment_ids))
                sequence += sampled[position : position + len(segment_ids)]
                position += len(segment_ids)
        results.append(
            PrivatisedPrompt(
                text="".join(parts),
                original_ids=all_ids[offset:position],
                privatised_ids=sampled[offset:position],
                epsilons=epsilons,
                sequence_ids=sequence,
                private_positions=positions,
            )
        )
    return results


def recovery_attack(
    mechanism: ExponentialMechanism, prompts: Sequence[PrivatisedPrompt], top_k: int
) -> dict[str, float]:
    """Nearest-neighbour inversion: the attacker, who holds the same embedding table, maps each
    privatised token to its nearest vocabulary entry and also lists the `top_k` nearest. The nearest
    entry is the token itself (the mechanism outputs real tokens), so `recovery_rate` is the share of
    tokens the mechanism left unchanged; `LikelihoodAttacker` is the real attack."""
    original = torch.tensor([i for p in prompts for i in p.original_ids], dtype=torch.long)
    received = torch.tensor([i for p in prompts for i in p.privatised_ids], dtype=torch.long)
    if original.numel() == 0:
        return {"tokens": 0, "recovery_rate": 0.0, f"recovery_rate_top{top_k}": 0.0}
    neighbours = mechanism.nearest_neighbours(received, top_k)
    hits = neighbours == original[:, None]
    return {
        "tokens": int(original.numel()),
        "recovery_rate": float(hits[:, 0].float().mean()),
        f"recovery_rate_top{top_k}": float(hits.any(dim=1).float().mean()),
    }


HISTOGRAM_BINS = 512  # resolution of each token's utility profile in the attacker's normaliser


class LikelihoodAttacker:
    """Bayesian reconstruction of private tokens from a privatised prompt (what the server can do).

    The attacker knows the mechanism (the embedding table, the candidates, each token's epsilon: a
    worst case, as the allocation is public but depends on roles it does not see) and holds a language
    model. For each private position it scores a candidate original x by

        log P_LM(x | context) + log P(y | x) = log P_LM(x | context) + eps * u(x, y) / (2 * SENSITIVITY) - log Z(x, eps)

    (y: the received token; Z(x, eps): the mechanism's normaliser for input x) and takes the argmax
    over the `candidates` most likely tokens under the prior and the `candidates` nearest to y. The
    context is the received prompt (template and privatised tokens) in a first pass, the attacker's own
    reconstruction in the next ones. log Z is computed from a histogram of each x's utilities
    (HISTOGRAM_BINS bins) over the candidate vocabulary, or, when it is larger than `normaliser_sample`,
    over a fixed random sample of it scaled to its size, with x's own term (utility 1) exact.
    """

    def __init__(
        self,
        mechanism: ExponentialMechanism,
        model: torch.nn.Module,
        candidates: int = 16,
        passes: int = 2,
        normaliser_sample: int = 8192,
    ):
        self.mechanism, self.model, self.candidates, self.passes = mechanism, model, candidates, passes
        self._histograms: dict[int, Tensor] = {}
        edges = torch.linspace(-1.0, 1.0, HISTOGRAM_BINS + 1)
        self._centres = (edges[:-1] + edges[1:]) / 2
        pool = torch.nonzero(mechanism.candidate_mask).squeeze(-1)
        if pool.numel() > normaliser_sample:
            chosen = torch.randperm(pool.numel(), generator=torch.Generator().manual_seed(0))[:normaliser_sample]
            pool = pool[chosen]
        self._sample, self._scale = pool, float(mechanism.candidate_mask.sum()) / pool.numel()

    def _log_counts(self, token_ids: list[int]) -> Tensor:
        missing = [t for t in dict.fromkeys(token_ids) if t not in self._histograms]
        for start in range(0, len(missing), 256):
            rows = torch.tensor(missing[start : start + 256], dtype=torch.long)
            utilities = (self.mechanism.unit[rows] @ self.mechanism.unit[self._sample].T).clamp(-1.0, 1.0)
            others = (rows[:, None] != self._sample[None, :]).float() * self._scale  # x itself counted once below
            bins = ((utilities + 1) / 2 * HISTOGRAM_BINS).long().clamp_(0, HISTOGRAM_BINS - 1)
            counts = torch.zeros(len(rows), HISTOGRAM_BINS).scatter_add_(1, bins, others)
            counts[:, -1] += self.mechanism.candidate_mask[rows].float()
            for token, row in zip(rows.tolist(), counts.log(), strict=True):
                self._histograms[token] = row
        return torch.stack([self._histograms[t] for t in token_ids])

    def log_likelihood(self, candidates: Tensor, received: int, epsilon: float) -> Tensor:
        """log P(received | x) for each candidate x (the histogram normaliser)."""
        scale = epsilon / (2 * SENSITIVITY)
        utility = (self.mechanism.unit[candidates] @ self.mechanism.unit[received]).clamp(-1.0, 1.0)
        log_z = torch.logsumexp(self._log_counts(candidates.tolist()) + scale * self._centres, dim=1)
        return scale * utility - log_z

    @torch.no_grad()
    def reconstruct(self, prompt: PrivatisedPrompt) -> list[int]:
        """The attacker's guess of each private token of `prompt`."""
        context = list(prompt.sequence_ids)
        guesses = list(prompt.privatised_ids)
        device = next(self.model.parameters()).device
        candidate_ids = torch.nonzero(self.mechanism.candidate_mask).squeeze(-1)
        for _ in range(self.passes):
            logits = self.model(input_ids=torch.tensor([context], device=device)).logits[0].float().cpu()
            for index, (position, received, epsilon) in enumerate(
                zip(prompt.private_positions, prompt.privatised_ids, prompt.epsilons, strict=True)
            ):
                if not math.isfinite(epsilon):
                    guesses[index] = received  # sent unchanged
                    continue
                prior = torch.full((self.mechanism.vocabulary_size,), -math.log(len(candidate_ids)))
                if position > 0:
                    width = min(logits.shape[1], self.mechanism.vocabulary_size)
                    prior[:width] = logits[position - 1, :width].log_softmax(-1)
                prior = prior.masked_fill(~self.mechanism.candidate_mask, -math.inf)
                near = self.mechanism.nearest_neighbours(torch.tensor([received]), self.candidates)[0]
                likely = prior.topk(self.candidates).indices
                pool = torch.cat([near, likely]).unique()
                score = prior[pool] + self.log_likelihood(pool, received, epsilon)
                guesses[index] = int(pool[score.argmax()])
            for position, guess in zip(prompt.private_positions, guesses, strict=True):
                context[position] = guess
        return guesses

    def attack(self, prompts: Sequence[PrivatisedPrompt]) -> dict[str, float]:
        """Top-1 recovery rate of the private tokens, next to the share sent unchanged."""
        hits = unchanged = total = 0
        for prompt in prompts:
            if not prompt.private_positions:
                continue
            guesses = self.reconstruct(prompt)
            hits += sum(g == o for g, o in zip(guesses, prompt.original_ids, strict=True))
            unchanged += sum(p == o for p, o in zip(prompt.privatised_ids, prompt.original_ids, strict=True))
            total += len(guesses)
        return {
            "tokens": total,
            "lm_recovery_rate": hits / total if total else 0.0,
            "unchanged_rate": unchanged / total if total else 0.0,
        }


def prompts_to_json(prompts: Sequence[PrivatisedPrompt]) -> list[dict[str, object]]:
    return [asdict(prompt) for prompt in prompts]


def prompts_from_json(rows: Sequence[dict[str, object]]) -> list[PrivatisedPrompt]:
    return [PrivatisedPrompt(**row) for row in rows]  # type: ignore[arg-type]


def vocabulary_candidates(tokenizer: PreTrainedTokenizerBase, embedding_rows: int) -> list[int]:
    """Tokens the mechanism may output: every real token of the tokenizer but its special ones."""
    special = set(tokenizer.all_special_ids)
    return [i for i in range(min(len(tokenizer), embedding_rows)) if i not in special]
