"""Server-guided compression of an LLM into a proxy small language model, and plug-in of proxy updates.

FedProxy (Fan et al.) hands clients a *proxy*: the LLM with fewer decoder layers and narrower ones,
which clients fine-tune whole; the server maps what they learned back onto the LLM without training.

Compression, on the server's own public text (never client data):

1. Importance. One pass of the LLM over public text measures, for every decoder layer, its block
   influence 1 - cos(h_in, h_out) (ShortGPT: how much the layer changes the residual stream); for every
   query head, the mean norm of its contribution W_o[:, head] a_head to the layer's output; for every
   MLP channel c, mean |x_c| x ||W_down[:, c]|| (x the input of down_proj).
2. Plan (`CompressionPlan`). The first and last layers are always kept, the other kept layers are the
   most influential. In every kept layer the same *numbers* of KV heads, query heads per KV head and
   MLP channels are kept (so the proxy is an ordinary Llama config that a client rebuilds from JSON),
   but *which* ones is chosen per layer by importance. Grouped-query attention is pruned consistently:
   a KV head is kept with a fixed number of its own query heads (the most important ones of its
   group), so every query head still reads the KV head it was trained with; a KV group's score is the
   sum of its query heads' scores. The hidden size (embeddings, norms, LM head) is never pruned: the
   proxy shares them with the LLM unchanged.
3. Size. `target_fraction` is the proxy's share of the LLM's *decoder-layer* parameters (embeddings
   and head are shared, not compressed; both shares are reported). With `num_layers` unset, depth and
   width shrink alike (about sqrt(target) each); the attention shape closest to the width ratio is
   chosen and the MLP width solved to meet the target.
4. Recovery. The proxy's decoder layers are trained on public text towards the LLM's next-token
   distributions: T^2 KL(p_LLM^T || p_proxy^T) + lm_weight x the proxy's own LM loss (logit distillation).
   The result is cached like distilled emulators (user cache, keyed by LLM weights, settings, texts, seed).

Plug-in (`plug_in_update`): a dense update of the proxy's decoder-layer weights (fine-tuned minus
initial proxy) is added to the LLM: proxy layer p goes to LLM layer `kept_layers[p]`, and each row or
column of a pruned matrix goes back to its original index (query/KV heads of q/k/v/o, MLP channels of
gate/up/down). Pruned heads and channels and dropped layers receive nothing (a zero update): nothing
was trained for them, and copying a neighbour's update would apply it to a different function. The
recovery distillation itself is not plugged in (it compensates for what the proxy lost, the LLM has it).

Proxy parameter names in adapter states are `layers.<proxy position>.<name>`: proxy shapes differ from
the LLM's, so a proxy state is only ever mapped to the LLM through a plan.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from transformers import AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from blindtune.encoding import pad_right
from blindtune.models.distill import TextBatches, optimise_parameters
from blindtune.models.loading import cache_dir, model_fingerprint, written_atomically
from blindtune.models.surgery import decoder_layers, split_canonical_name

log = logging.getLogger(__name__)

_CACHE_VERSION = 1  # bump when compression or recovery changes, so stale cached proxies are not reused
_ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP = ("gate_proj", "up_proj", "down_proj")

ProxyUpdate = dict[str, Tensor]  # "layers.<proxy position>.<name>" -> dense update, proxy-shaped


class CompressionError(ValueError):
    """The model cannot be compressed as asked (architecture, sizes), or an update does not fit the plan."""


@dataclass
class LogitDistillConfig:
    """Recovery of the proxy by logit distillation from the LLM on public text.

    steps / batch_size / max_length / learning_rate: AdamW steps over batches of public texts of at
        most max_length tokens (only the proxy's decoder layers are trained).
    temperature: softmax temperature T of both distributions (the KL term is scaled by T^2).
    lm_weight: weight of the proxy's own next-token loss next to the KL term.
    """

    steps: int = 100
    batch_size: int = 8
    max_length: int = 64
    learning_rate: float = 2e-4
    temperature: float = 2.0
    lm_weight: float = 0.1

    def __post_init__(self) -> None:
        if self.steps < 0 or self.batch_size < 1 or self.max_length < 2 or self.learning_rate <= 0:
            raise ValueError(f"invalid distillation settings: {self}")
        if self.temperature <= 0 or self.lm_weight < 0:
            raise ValueError(f"temperature must be > 0 and lm_weight >= 0: {self}")


@dataclass
class CompressionConfig:
    """How the server derives the proxy from its LLM.

    target_fraction: the proxy's decoder-layer parameters as a share of the LLM's (embeddings and LM
        head are shared unchanged and not counted; the share of all parameters is reported too).
    num_layers: decoder layers the proxy keeps (first and last always); None: depth and width are
        reduced alike, about sqrt(target_fraction) each.
    importance_texts / importance_max_length: public texts (and tokens per text) of the importance pass.
    distill: logit-distillation recovery; None hands out the pruned proxy as is.
    """

    target_fraction: float = 0.35
    num_layers: int | None = None
    importance_texts: int = 64
    importance_max_length: int = 64
    distill: LogitDistillConfig | None = field(default_factory=LogitDistillConfig)

    def __post_init__(self) -> None:
        if not 0 < self.target_fraction <= 1:
            raise ValueError(f"target_fraction must be in (0, 1], got {self.target_fraction}")
        if self.num_layers is not None and self.num_layers < 2:
            raise ValueError(f"num_layers must be >= 2 (the first and last layers are kept), got {self.num_layers}")
        if self.importance_texts < 1 or self.importance_max_length < 2:
            raise ValueError(f"invalid importance settings: {self}")


# ---- the plan --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CompressionPlan:
    """Which parts of the LLM the proxy keeps, as LLM indices (ascending within each group).

    kv_heads[p] / query_heads[p] / mlp_channels[p] belong to proxy layer p = LLM layer kept_layers[p].
    query_heads[p] lists, for each kept KV head in order, the kept query heads of its group.
    """

    num_llm_layers: int
    num_query_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    kept_layers: tuple[int, ...]
    kv_heads: tuple[tuple[int, ...], ...]
    query_heads: tuple[tuple[int, ...], ...]
    mlp_channels: tuple[tuple[int, ...], ...]

    def __post_init__(self) -> None:
        layers = len(self.kept_layers)
        if not layers or any(len(x) != layers for x in (self.kv_heads, self.query_heads, self.mlp_channels)):
            raise CompressionError("a plan needs kv_heads, query_heads and mlp_channels for every kept layer")
        _check_indices("kept_layers", self.kept_layers, self.num_llm_layers)
        group = self.num_query_heads // self.num_kv_heads
        for position in range(layers):
            kv, queries = self.kv_heads[position], self.query_heads[position]
            _check_indices(f"kv_heads[{position}]", kv, self.num_kv_heads)
            _check_indices(f"mlp_channels[{position}]", self.mlp_channels[position], self.intermediate_size)
            per_group = len(queries) // len(kv)
            expected_groups = [head // group for head in queries]
            if len(queries) != per_group * len(kv) or expected_groups != [g for g in kv for _ in range(per_group)]:
                raise CompressionError(
                    f"query_heads[{position}] must list {per_group} query heads of each kept KV group {kv}, "
                    f"got {queries}"
                )
            _check_indices(f"query_heads[{position}]", queries, self.num_query_heads)
        counts = {
            (len(kv), len(q), len(m))
            for kv, q, m in zip(self.kv_heads, self.query_heads, self.mlp_channels, strict=True)
        }
        if len(counts) != 1:
            raise CompressionError(f"every kept layer must keep as many KV heads, query heads and channels: {counts}")

    @property
    def num_proxy_layers(self) -> int:
        return len(self.kept_layers)

    def row_and_column_indices(self, position: int, name: str) -> tuple[Tensor | None, Tensor | None]:
        """The LLM row and column indices of proxy parameter `name` (inside layer `position`); None: all.

        A 1-D parameter (norm weight, bias) has rows only.
        """
        module = name.rsplit(".", 1)[0].rsplit(".", 1)[-1]
        heads = _expand(self.query_heads[position], self.head_dim)
        kv = _expand(self.kv_heads[position], self.head_dim)
        channels = torch.tensor(self.mlp_channels[position], dtype=torch.long)
        is_bias = name.endswith(".bias")
        if module == "q_proj":
            return heads, None
        if module in ("k_proj", "v_proj"):
            return kv, None
        if module == "o_proj":
            return (None, None) if is_bias else (None, heads)
        if module in ("gate_proj", "up_proj"):
            return channels, None
        if module == "down_proj":
            return (None, None) if is_bias else (None, channels)
        return None, None

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> CompressionPlan:
        data = json.loads(text)
        for key in ("kept_layers",):
            data[key] = tuple(data[key])
        for key in ("kv_heads", "query_heads", "mlp_channels"):
            data[key] = tuple(tuple(v) for v in data[key])
        return cls(**data)


def _check_indices(what: str, values: Sequence[int], bound: int) -> None:
    if not values or list(values) != sorted(set(values)) or values[0] < 0 or values[-1] >= bound:
        raise CompressionError(f"{what} must be distinct ascending indices in [0, {bound}), got {list(values)}")


def _expand(heads: Sequence[int], head_dim: int) -> Tensor:
    """Head indices -> the row/column indices of their head_dim-wide blocks."""
    return torch.tensor([h * head_dim + i for h in heads for i in range(head_dim)], dtype=torch.long)


# ---- importance -------------------------------------------------------------------------------------


@dataclass
class Importance:
    """Importance of the LLM's parts on public text (higher: more important)."""

    layers: Tensor  # (num_layers,) block influence
    query_heads: Tensor  # (num_layers, num_query_heads)
    mlp_channels: Tensor  # (num_layers, intermediate_size)


def _architecture(llm: PreTrainedModel) -> tuple[int, int, int, int]:
    """(query heads, KV heads, head_dim, intermediate size) of a Llama-architecture model."""
    config = llm.config
    layer = decoder_layers(llm)[0]
    if not all(hasattr(layer.self_attn, m) for m in _ATTENTION) or not all(hasattr(layer.mlp, m) for m in _MLP):
        raise CompressionError(
            f"compression supports Llama-architecture decoders (q/k/v/o_proj, gate/up/down_proj); "
            f"{type(llm).__name__} is not one"
        )
    heads = int(config.num_attention_heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    return heads, kv_heads, head_dim, int(config.intermediate_size)


def measure_importance(
    llm: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], max_length: int, batch_size: int = 8
) -> Importance:
    """Block influence of layers, output contribution of query heads, activation x weight of MLP channels."""
    heads, _, head_dim, intermediate = _architecture(llm)
    layers = decoder_layers(llm)
    device = next(llm.parameters()).device  # the hooks accumulate where the LLM computes
    influence = torch.zeros(len(layers), dtype=torch.float64, device=device)
    head_scores = torch.zeros(len(layers), heads, dtype=torch.float64, device=device)
    channel_scores = torch.zeros(len(layers), intermediate, dtype=torch.float64, device=device)
    tokens = 0
    real = torch.zeros(0, dtype=torch.bool)  # the current batch's non-padding positions, read by the hooks

    def layer_hook(index: int) -> Any:
        def hook(_module: nn.Module, args: Any, kwargs: Any, output: Any) -> None:
            hidden_in = args[0] if args else kwargs["hidden_states"]
            hidden_out = output[0] if isinstance(output, tuple) else output
            cosine = F.cosine_similarity(hidden_in[real].double(), hidden_out[real].double(), dim=-1)
            influence[index] += (1 - cosine).sum()

        return hook

    def head_hook(index: int, o_proj: nn.Linear) -> Any:
        def hook(_module: nn.Module, args: Any) -> None:
            per_head = args[0][real].double().reshape(-1, heads, head_dim)
            weight = o_proj.weight.double().reshape(-1, heads, head_dim)
            contribution = torch.einsum("nhd,ohd->nho", per_head, weight)
            head_scores[index] += contribution.norm(dim=-1).sum(dim=0)

        return hook

    def channel_hook(index: int, down_proj: nn.Linear) -> Any:
        def hook(_module: nn.Module, args: Any) -> None:
            activation = args[0][real].double().abs().sum(dim=0)
            channel_scores[index] += activation * down_proj.weight.double().norm(dim=0)

        return hook

    handles = []
    for index, layer in enumerate(layers):
        o_proj: Any = layer.get_submodule("self_attn.o_proj")
        down_proj: Any = layer.get_submodule("mlp.down_proj")
        handles.append(layer.register_forward_hook(layer_hook(index), with_kwargs=True))
        handles.append(o_proj.register_forward_pre_hook(head_hook(index, o_proj)))
        handles.append(down_proj.register_forward_pre_hook(channel_hook(index, down_proj)))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    try:
        with torch.no_grad():
            for start in range(0, len(texts), batch_size):
                sequences = [
                    list(tokenizer(text, truncation=True, max_length=max_length)["input_ids"])
                    for text in texts[start : start + batch_size]
                ]
                ids, mask = pad_right([s for s in sequences if s], pad_id)
                real = mask.bool().to(device)
                tokens += int(real.sum())
                llm(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    if tokens == 0:
        raise CompressionError("no public text tokens to measure importance on")
    return Importance(
        layers=(influence / tokens).float().cpu(),
        query_heads=(head_scores / tokens).float().cpu(),
        mlp_channels=(channel_scores / tokens).float().cpu(),
    )


# ---- sizing and planning ----------------------------------------------------------------------------


@dataclass(frozen=True)
class ProxyShape:
    """Per-layer counts the proxy keeps."""

    num_layers: int
    kv_heads: int
    queries_per_kv: int
    mlp_channels: int


def _layer_parameters(llm: PreTrainedModel, shape: ProxyShape | None) -> int:
    """Parameters of one decoder layer of the LLM (shape None) or of the proxy shape."""
    heads, kv_heads, _, intermediate = _architecture(llm)
    total = 0
    for name, parameter in decoder_layers(llm)[0].named_parameters():
        count = parameter.numel()
        if shape is not None:
            module = name.rsplit(".", 1)[0].rsplit(".", 1)[-1]
            if module == "q_proj" or (module == "o_proj" and not name.endswith(".bias")):
                count = count * shape.kv_heads * shape.queries_per_kv // heads
            elif module in ("k_proj", "v_proj"):
                count = count * shape.kv_heads // kv_heads
            elif module in ("gate_proj", "up_proj") or (module == "down_proj" and not name.endswith(".bias")):
                count = count * shape.mlp_channels // intermediate
        total += count
    return total


def decoder_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in decoder_layers(model).parameters())


def solve_shape(llm: PreTrainedModel, config: CompressionConfig) -> ProxyShape:
    """The kept layer count and per-layer widths whose decoder parameters are about target_fraction."""
    heads, kv_heads, _, intermediate = _architecture(llm)
    num_llm_layers = len(decoder_layers(llm))
    num_layers = config.num_layers
    if num_layers is None:
        num_layers = max(2, min(num_llm_layers, round(num_llm_layers * math.sqrt(config.target_fraction))))
    if num_layers > num_llm_layers:
        raise CompressionError(f"num_layers={num_layers} exceeds the LLM's {num_llm_layers} layers")
    full_layer = _layer_parameters(llm, None)
    budget = config.target_fraction * full_layer * num_llm_layers / num_layers
    if budget > full_layer * 1.0001:
        raise CompressionError(
            f"keeping {num_layers} of {num_llm_layers} layers at full width is only "
            f"{num_layers / num_llm_layers:.0%} of the decoder; "
            f"target_fraction={config.target_fraction} needs more layers"
        )
    ratio = budget / full_layer
    group = heads // kv_heads
    # Closest query-head share to the width ratio; on a tie keep more KV heads (more distinct keys/values).
    kv_keep, per_kv = min(
        ((kv, q) for kv in range(1, kv_heads + 1) for q in range(1, group + 1)),
        key=lambda option: (abs(option[0] * option[1] / heads - ratio), -option[0]),
    )
    without_mlp = _layer_parameters(llm, ProxyShape(num_layers, kv_keep, per_kv, 0))
    per_channel = _layer_parameters(llm, ProxyShape(num_layers, kv_keep, per_kv, intermediate)) - without_mlp
    channels = round((budget - without_mlp) * intermediate / per_channel)
    if channels < 1:
        raise CompressionError(
            f"target_fraction={config.target_fraction} with {num_layers} layers leaves no MLP channels; "
            "raise target_fraction or num_layers"
        )
    return ProxyShape(num_layers, kv_keep, per_kv, min(channels, intermediate))


def plan_compression(llm: PreTrainedModel, importance: Importance, shape: ProxyShape) -> CompressionPlan:
    """Keep the first, last and most influential layers, and in each the most important heads/channels."""
    heads, kv_heads, head_dim, intermediate = _architecture(llm)
    num_llm_layers = len(decoder_layers(llm))
    ends = {0, num_llm_layers - 1}
    middle = sorted(set(range(num_llm_layers)) - ends, key=lambda i: -float(importance.layers[i]))
    kept_layers = tuple(sorted(ends | set(middle[: shape.num_layers - len(ends)])))
    group = heads // kv_heads
    kv_kept, queries_kept, channels_kept = [], [], []
    for layer in kept_layers:
        scores = importance.query_heads[layer].reshape(kv_heads, group)
        kv = sorted(torch.topk(scores.sum(dim=1), shape.kv_heads).indices.tolist())
        queries = [
            kv_head * group + q
            for kv_head in kv
            for q in sorted(torch.topk(scores[kv_head], shape.queries_per_kv).indices.tolist())
        ]
        kv_kept.append(tuple(kv))
        queries_kept.append(tuple(queries))
        channels_kept.append(
            tuple(sorted(torch.topk(importance.mlp_channels[layer], shape.mlp_channels).indices.tolist()))
        )
    return CompressionPlan(
        num_llm_layers=num_llm_layers,
        num_query_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        intermediate_size=intermediate,
        kept_layers=kept_layers,
        kv_heads=tuple(kv_kept),
        query_heads=tuple(queries_kept),
        mlp_channels=tuple(channels_kept),
    )


# ---- building the proxy -----------------------------------------------------------------------------


def gather(llm_tensor: Tensor, rows: Tensor | None, columns: Tensor | None) -> Tensor:
    """The kept rows/columns of an LLM tensor (None: all)."""
    kept = llm_tensor if rows is None else llm_tensor.index_select(0, rows.to(llm_tensor.device))
    return kept if columns is None else kept.index_select(1, columns.to(llm_tensor.device))


def scatter_add(llm_tensor: Tensor, rows: Tensor | None, columns: Tensor | None, update: Tensor) -> None:
    """Add a proxy-shaped update to the kept rows/columns of an LLM tensor, in place."""
    device = llm_tensor.device
    row_index = (torch.arange(llm_tensor.shape[0]) if rows is None else rows).to(device)
    if llm_tensor.dim() == 1:
        llm_tensor.index_add_(0, row_index, update.to(device, llm_tensor.dtype))
        return
    column_index = (torch.arange(llm_tensor.shape[1]) if columns is None else columns).to(device)
    llm_tensor.index_put_(
        (row_index.unsqueeze(1), column_index.unsqueeze(0)), update.to(device, llm_tensor.dtype), accumulate=True
    )


def build_proxy(llm: PreTrainedModel, plan: CompressionPlan) -> PreTrainedModel:
    """A Llama model with the plan's layers and widths, holding the LLM's weights at the kept indices."""
    heads, kv_heads, head_dim, intermediate = _architecture(llm)
    if (plan.num_llm_layers, plan.num_query_heads, plan.num_kv_heads, plan.head_dim, plan.intermediate_size) != (
        len(decoder_layers(llm)),
        heads,
        kv_heads,
        head_dim,
        intermediate,
    ):
        raise CompressionError("the compression plan was made for a model of another shape")
    config = copy.deepcopy(llm.config)
    config.num_hidden_layers = plan.num_proxy_layers
    config.num_attention_heads = len(plan.query_heads[0])
    config.num_key_value_heads = len(plan.kv_heads[0])
    config.head_dim = head_dim  # explicit: hidden_size / heads no longer gives it
    config.intermediate_size = len(plan.mlp_channels[0])
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        config.layer_types = [layer_types[i] for i in plan.kept_layers]
    proxy = AutoModelForCausalLM.from_config(config, dtype=next(llm.parameters()).dtype)
    proxy.to(next(llm.parameters()).device)  # the proxy computes where the LLM does
    state = {}
    llm_layers = decoder_layers(llm)
    for name, tensor in llm.state_dict().items():
        if ".layers." not in f".{name}":
            state[name] = tensor
    prefix = _layers_prefix(llm)
    for position, source in enumerate(plan.kept_layers):
        for name, tensor in llm_layers[source].state_dict().items():
            rows, columns = plan.row_and_column_indices(position, name)
            state[f"{prefix}{position}.{name}"] = gather(tensor, rows, columns).clone()
    proxy.load_state_dict(state, strict=True)
    proxy.tie_weights()
    proxy.eval()
    return proxy


def _layers_prefix(model: nn.Module) -> str:
    """The state-dict prefix of decoder layer i, without the index ("model.layers.")."""
    first = decoder_layers(model)[0]
    for name, module in model.named_modules():
        if module is first:
            return name[: -len("0")]
    raise CompressionError("cannot locate the decoder layers in the model's state dict")


# ---- recovery by logit distillation --------------------------------------------------------------------


def distill_logits(
    llm: nn.Module,
    proxy: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    config: LogitDistillConfig,
    *,
    seed: int = 0,
    progress: bool = True,
) -> list[dict[str, float]]:
    """Train the proxy's decoder layers (in place) towards the LLM's next-token distributions; per-step losses."""
    batches = TextBatches(tokenizer, texts, config.max_length, seed)  # refuses empty texts
    temperature = config.temperature

    def backward_step() -> dict[str, float]:
        ids, mask = batches.next(config.batch_size)
        real = mask[:, 1:].bool()
        with torch.no_grad():
            teacher = llm(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1][real].float()
        student = proxy(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1][real].float()
        kl = F.kl_div(
            F.log_softmax(student / temperature, dim=-1),
            F.log_softmax(teacher / temperature, dim=-1),
            log_target=True,
            reduction="batchmean",
        ) * (temperature**2)
        lm = F.cross_entropy(student, ids[:, 1:][real])
        loss = kl + config.lm_weight * lm
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"the loss became {loss.item()}")
        loss.backward()
        return {"loss": loss.item(), "kl": kl.item(), "lm": lm.item()}

    history = optimise_parameters(
        proxy,
        list(decoder_layers(proxy).parameters()),
        config.steps,
        config.learning_rate,
        backward_step,
        "distil proxy",
        progress,
    )
    proxy.eval()
    return history


# ---- preparing (and caching) a proxy --------------------------------------------------------------------


@dataclass
class PreparedProxy:
    model: PreTrainedModel
    plan: CompressionPlan
    history: list[dict[str, float]]  # distillation losses per step (empty when loaded from the cache)
    from_cache: bool


def prepare_proxy(
    llm: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    config: CompressionConfig,
    *,
    seed: int = 0,
    cache: bool = True,
    progress: bool = True,
) -> PreparedProxy:
    """Measure importance on `texts`, plan, build and (if configured) distil the proxy.

    With `cache`, the plan and the proxy's decoder layers are stored in the user cache directory under
    a key of the LLM's weights, the settings, the texts and the seed, and reused by later runs.
    """
    path = _cache_path(llm, texts, config, seed) if cache else None
    if path is not None and path.is_file() and path.with_suffix(".json").is_file():
        plan = CompressionPlan.from_json(path.with_suffix(".json").read_text())
        proxy = build_proxy(llm, plan)
        _load_layers(proxy, path)
        return PreparedProxy(model=proxy, plan=plan, history=[], from_cache=True)
    importance_texts = list(texts[: config.importance_texts])
    importance = measure_importance(llm, tokenizer, importance_texts, config.importance_max_length)
    plan = plan_compression(llm, importance, solve_shape(llm, config))
    proxy = build_proxy(llm, plan)
    history = []
    if config.distill is not None:
        history = distill_logits(llm, proxy, tokenizer, texts, config.distill, seed=seed, progress=progress)
    if path is not None:
        _save_layers(proxy, path)
        path.with_suffix(".json").write_text(plan.to_json())
    return PreparedProxy(model=proxy, plan=plan, history=history, from_cache=False)


def _cache_path(llm: nn.Module, texts: Sequence[str], config: CompressionConfig, seed: int) -> Path:
    digest = hashlib.sha256()
    digest.update(json.dumps([_CACHE_VERSION, asdict(config), seed]).encode())
    digest.update("\n".join(texts).encode())
    digest.update(model_fingerprint(llm).encode())
    return cache_dir() / "proxies" / f"{digest.hexdigest()[:24]}.safetensors"


def _save_layers(proxy: nn.Module, path: Path) -> None:
    with written_atomically(path) as temporary:
        save_file(
            {n: t.detach().cpu().contiguous() for n, t in decoder_layers(proxy).state_dict().items()}, str(temporary)
        )


def _load_layers(proxy: nn.Module, path: Path) -> None:
    stored = load_file(str(path))
    layers = decoder_layers(proxy)
    if set(stored) != set(layers.state_dict()):
        raise CompressionError(f"cached proxy {path} does not fit its plan; delete it")
    layers.load_state_dict(stored)


# ---- the proxy's update and its plug-in ----------------------------------------------------------------


def proxy_layer_state(proxy: nn.Module) -> ProxyUpdate:
    """Copies of the proxy's decoder-layer tensors, named `layers.<position>.<name>`."""
    return {
        f"layers.{name}": tensor.detach().to("cpu", copy=True)
        for name, tensor in decoder_layers(proxy).state_dict().items()
    }


def proxy_update(tuned: nn.Module, initial: ProxyUpdate) -> ProxyUpdate:
    """Fine-tuned minus initial proxy decoder-layer weights (what plug-in maps onto the LLM)."""
    current = proxy_layer_state(tuned)
    if set(current) != set(initial):
        raise CompressionError("the tuned proxy's layers differ from the initial proxy's")
    return {name: current[name].float() - initial[name].float() for name in initial}


def plug_in_update(llm: nn.Module, plan: CompressionPlan, update: ProxyUpdate) -> None:
    """Add a proxy update to the LLM in place: kept layers to their source layers, rows/columns to their
    original indices. Dropped layers and pruned heads/channels are left unchanged."""
    layers = decoder_layers(llm)
    if len(layers) != plan.num_llm_layers:
        raise CompressionError(f"the plan is for {plan.num_llm_layers} layers, the LLM has {len(layers)}")
    checked = []
    for name, delta in update.items():
        position, inner = split_canonical_name(name)
        if position >= plan.num_proxy_layers:
            raise CompressionError(f"{name}: the proxy has only {plan.num_proxy_layers} layers")
        target = layers[plan.kept_layers[position]].state_dict().get(inner)
        if target is None:
            raise CompressionError(f"{name}: the LLM's layers have no parameter {inner!r}")
        rows, columns = plan.row_and_column_indices(position, inner)
        expected = tuple(gather(target, rows, columns).shape)
        if tuple(delta.shape) != expected:
            raise CompressionError(f"{name}: update shape {tuple(delta.shape)} != proxy shape {expected}")
        if not torch.isfinite(delta).all():
            raise CompressionError(f"{name} holds NaN or Inf values")
        checked.append((position, inner, rows, columns, delta))
    with torch.no_grad():
        for position, inner, rows, columns, delta in checked:
            parameter = layers[plan.kept_layers[position]].get_parameter(inner)
            scatter_add(parameter.data, rows, columns, delta)


@contextmanager
def plugged_in_update(llm: nn.Module, plan: CompressionPlan, update: ProxyUpdate) -> Iterator[nn.Module]:
    """Temporarily plug a proxy update into the LLM; the touched layers are restored on exit."""
    layers = decoder_layers(llm)
    touched = sorted({plan.kept_layers[split_canonical_name(n)[0]] for n in update if _in_plan(n, plan)})
    originals = {i: {k: v.clone() for k, v in layers[i].state_dict().items()} for i in touched}
    try:
        plug_in_update(llm, plan, update)
        yield llm
    finally:
        for index, original in originals.items():
            layers[index].load_state_dict(original)


def _in_plan(name: str, plan: CompressionPlan) -> bool:
    return split_canonical_name(name)[0] < plan.num_proxy_layers
