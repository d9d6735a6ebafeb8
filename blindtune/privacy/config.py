"""The `privacy` section of a run config: DP-SGD on clients, DP on the server, SecAgg+, and audits.

Every switch is off by default, so a run config without a `privacy` section behaves as before (the
cheap ledger check excepted, which only reads what the server received). Example:

    privacy:
      dp:                      # sample-level DP-SGD on each client (Opacus)
        enabled: true
        target_epsilon: 8.0    # or noise_multiplier: 0.6
        max_grad_norm: 1.0
      secagg:
        enabled: true          # the server only sees the sum of the clients' adapters
      audit:
        membership_inference: true
        misuse: true
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class AccountantKind(enum.StrEnum):
    RDP = "rdp"  # Renyi DP (Mironov 2017): Opacus' RDPAccountant
    PRV = "prv"  # privacy random variables (Gopi et al. 2021): Opacus' PRVAccountant, tighter


class ClippingKind(enum.StrEnum):
    FIXED = "fixed"  # DifferentialPrivacyServerSideFixedClipping
    ADAPTIVE = "adaptive"  # DifferentialPrivacyServerSideAdaptiveClipping (Andrew et al. 2021)


@dataclass
class DPSGDConfig:
    """Sample-level differential privacy: DP-SGD (Abadi et al. 2016) on each client, with Opacus.

    Each step samples every local example independently with probability batch_size / N (Poisson
    sampling; N is the client's number of examples), clips each example's gradient to `max_grad_norm`
    and adds Gaussian noise of standard deviation noise_multiplier * max_grad_norm to their sum. The
    client's accountant composes every step of every round, so the epsilon it reports is what the
    whole run spent on its data; the run's epsilon is the largest client's (clients hold disjoint data).

    enabled: train every client's adapter with DP-SGD; a client that cannot refuses to train.
    noise_multiplier: the noise's standard deviation in units of max_grad_norm. Give this or
        `target_epsilon`, not both.
    target_epsilon: pick the smallest noise multiplier whose epsilon after all planned rounds is at
        most this (the accountant's own search, for rounds x train.steps steps).
    delta: the delta of (epsilon, delta)-DP; None means min(1e-5, 1 / (10 N)) for a client with N
        examples. A delta >= 1/N is refused when the client trains.
    max_grad_norm: per-example gradient clipping bound C (replaces train.max_grad_norm).
    accountant: `rdp` (Renyi DP) or `prv` (PRV accountant, tighter).
    secure_mode: cryptographically strong noise (needs torchcsprng; off for experiments).
    """

    enabled: bool = False
    noise_multiplier: float | None = None
    target_epsilon: float | None = None
    delta: float | None = None
    max_grad_norm: float = 1.0
    accountant: AccountantKind = AccountantKind.RDP
    secure_mode: bool = False

    def __post_init__(self) -> None:
        self.accountant = AccountantKind(self.accountant)
        if self.max_grad_norm <= 0:
            raise ValueError("privacy.dp.max_grad_norm must be > 0")
        if self.delta is not None and not 0 < self.delta < 1:
            raise ValueError("privacy.dp.delta must lie in (0, 1)")
        if self.noise_multiplier is not None and self.noise_multiplier < 0:
            raise ValueError("privacy.dp.noise_multiplier must be >= 0")
        if self.target_epsilon is not None and self.target_epsilon <= 0:
            raise ValueError("privacy.dp.target_epsilon must be > 0")
        if self.enabled and (self.noise_multiplier is None) == (self.target_epsilon is None):
            raise ValueError("privacy.dp needs exactly one of noise_multiplier and target_epsilon")


@dataclass
class ServerDPConfig:
    """Client-level differential privacy on the server (McMahan et al. 2018), with Flower's wrappers.

    Each round, every client's update (its adapter minus the global one) is clipped to `clipping_norm`
    and Gaussian noise of standard deviation noise_multiplier * clipping_norm / clients is added to
    their uniform average. Protects whole clients from whoever uses the aggregated adapter; needs a
    trusted server (the server sees each update), so it cannot be combined with `secagg`.

    enabled: aggregate with Flower's DifferentialPrivacyServerSide{Fixed,Adaptive}Clipping.
    clipping: `fixed` or `adaptive` (the norm follows a target quantile of the update norms).
    noise_multiplier: noise standard deviation in units of the clipping norm.
    clipping_norm: the clipping bound (the initial one for `adaptive`).
    target_clipped_quantile, clip_norm_lr: adaptive clipping's target quantile and step size.
    clipped_count_stddev: adaptive clipping's noise on the count of clipped updates. None: Flower's
        default, clients / 20, which must exceed noise_multiplier / 2 (with few clients, set it; the
        update noise grows so that the total still amounts to `noise_multiplier`).
    delta: delta for the reported client-level epsilon (every client takes part in every round).
    """

    enabled: bool = False
    clipping: ClippingKind = ClippingKind.FIXED
    noise_multiplier: float = 1.0
    clipping_norm: float = 1.0
    target_clipped_quantile: float = 0.5
    clip_norm_lr: float = 0.2
    clipped_count_stddev: float | None = None
    delta: float = 1e-5

    def __post_init__(self) -> None:
        self.clipping = ClippingKind(self.clipping)
        if self.noise_multiplier < 0 or self.clipping_norm <= 0:
            raise ValueError("privacy.server_dp: noise_multiplier must be >= 0 and clipping_norm > 0")
        if not 0 < self.delta < 1:
            raise ValueError("privacy.server_dp.delta must lie in (0, 1)")


@dataclass
class SecAggConfig:
    """Secure aggregation with Flower's SecAgg+ (Bell et al. 2020): the server learns only the sum.

    Clients quantise their weighted adapter into integers, mask them with pairwise and private masks
    that cancel in the sum, and the server unmasks only the aggregate. Individual updates cannot be
    screened (outliers, norms) by the server in this mode.

    enabled: run every round through SecAggPlusWorkflow (server) and secaggplus_mod (clients).
    share_fraction: each client's secrets are split among this fraction of the clients.
    threshold_fraction: fraction of those shares needed to reconstruct a secret (dropout tolerance).
    clipping_range: adapter values are clipped to [-clipping_range, clipping_range] before quantisation.
    quantization_range: integers per value after quantisation (resolution 2 * clipping_range / this).
    max_weight: at least the largest client weight (its number of examples); a client weighs its
        values by weight / max_weight before quantising, so a much larger bound costs precision.
    timeout_seconds: how long each of the four protocol stages waits for replies (None: forever).
    """

    enabled: bool = False
    share_fraction: float = 1.0
    threshold_fraction: float = 0.67
    clipping_range: float = 8.0
    quantization_range: int = 2**22
    max_weight: float = 10_000.0
    timeout_seconds: float | None = None

    def __post_init__(self) -> None:
        if not 0 < self.share_fraction <= 1 or not 0 < self.threshold_fraction <= 1:
            raise ValueError("privacy.secagg: share_fraction and threshold_fraction must lie in (0, 1]")
        if self.clipping_range <= 0 or self.quantization_range < 2 or self.max_weight <= 0:
            raise ValueError("privacy.secagg: clipping_range, quantization_range and max_weight must be positive")


@dataclass
class AuditConfig:
    """Privacy audits written to results.json's `privacy` section (also: `blindtune audit RUN_DIR`).

    membership_inference: loss and reference-model loss-ratio attacks on the adapted LLM; members are
        client training examples, non-members held-out examples of the same task.
    mia_examples: at most this many members and as many non-members are scored.
    misuse: how well the artefact the server handed out (emulator, proxy) works as a standalone model:
        its accuracy alone and with the final adapter, and its perplexity against the LLM's.
    perplexity_examples: held-out examples (prompt + answer) the perplexities are measured on.
    ledger: check that no client raw text reached the server (cheap; reads the server's inbox).
    limit_client_examples: train each client on only its first k examples (a small member set makes
        memorisation measurable); None keeps every example.
    """

    membership_inference: bool = False
    mia_examples: int = 500
    misuse: bool = False
    perplexity_examples: int = 200
    ledger: bool = True
    limit_client_examples: int | None = None

    def __post_init__(self) -> None:
        if self.mia_examples < 2 or self.perplexity_examples < 1:
            raise ValueError("privacy.audit: mia_examples must be >= 2 and perplexity_examples >= 1")
        if self.limit_client_examples is not None and self.limit_client_examples < 1:
            raise ValueError("privacy.audit.limit_client_examples must be >= 1")


@dataclass
class PrivacyConfig:
    """Privacy protections of a run and the audits that measure them (see each section)."""

    dp: DPSGDConfig = field(default_factory=DPSGDConfig)
    server_dp: ServerDPConfig = field(default_factory=ServerDPConfig)
    secagg: SecAggConfig = field(default_factory=SecAggConfig)
    audit: AuditConfig = field(default_factory=AuditConfig)

    def __post_init__(self) -> None:
        if self.secagg.enabled and self.server_dp.enabled:
            raise ValueError(
                "privacy.server_dp clips each client's update on the server, which secure aggregation hides; "
                "with privacy.secagg use client-side DP-SGD (privacy.dp) instead"
            )

    @property
    def server_side(self) -> bool:
        """Whether the server's round loop must change (secure aggregation or server-side DP)."""
        return self.secagg.enabled or self.server_dp.enabled
