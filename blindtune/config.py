"""Typed run configuration, loaded from YAML with unknown keys rejected.

A run config names a method and carries the shared sections (model, task, federation, training,
evaluation) plus one section for the method, whose dataclass the caller supplies (`method_sections`:
`blindtune.methods.config_class`, so the methods layer types its own sections and this module
knows no method). Loading is a strict recursive conversion of plain YAML data into those
dataclasses: a misspelt key, a wrong type or an invalid enum value stops the run with the path of
the offending key.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
import types
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

import yaml

from blindtune.data import TaskData, load_task
from blindtune.data.multiple_choice import check_template
from blindtune.data.partition import PartitionScheme
from blindtune.data.task import is_user_task
from blindtune.eval.tasks import TaskEvaluator
from blindtune.federation.engine import Engine
from blindtune.federation.strategies import StrategyName
from blindtune.models.device import DeviceName, Placement, resolve_placement
from blindtune.models.loading import DEFAULT_MODEL
from blindtune.privacy.config import PrivacyConfig
from blindtune.training.loop import TrainConfig

T = TypeVar("T")

# A method's name -> the dataclass of its config section (raises for an unknown method).
MethodSections = Callable[[str], type[Any]]


class ConfigError(ValueError):
    """The configuration is invalid; the message names the key path."""


@dataclass
class FederationConfig:
    """How the federation runs.

    num_clients: number of client organisations (virtual SuperNodes in simulation).
    rounds: federated rounds.
    min_clients: a round proceeds only if at least this many clients reply (default: all).
    partition: how the task's train split is divided among clients: `iid` or `dirichlet` (label skew).
    dirichlet_alpha: concentration for `dirichlet` partitions (small = more skew).
    engine: `simulation` (Flower's simulation engine) or `inprocess` (same apps, no Ray; for tests).
        A deployment (SuperLink and SuperNodes as processes) is `blindtune launch`, not an engine value.
    max_update_norm_ratio: updates whose norm exceeds this multiple of the median are rejected.
    client_timeout_seconds: a client that has not replied by then is dropped from the round.
    strategy: aggregation: `fedavg`, `fedprox`, `ffa_lora` (A frozen, only B trained and sent),
        `flora` (stacked LoRA products, allows per-client ranks), `ties` (TIES-merging of the client
        updates: trim, elect sign, merge agreeing entries) or `conflict_projection` (each update loses
        its components that conflict with the others' before the mean; see
        `blindtune.federation.strategies`).
    proximal_mu: FedProx's proximal weight (strategy `fedprox`).
    ties_density: share of each client update's largest-magnitude entries kept by `ties` (per tensor).
    ties_scale: `ties` moves the global state by this multiple of the merged update.
    client_lora_ranks: per-client LoRA ranks, client i gets entry i mod length (`flora` only; empty:
        every client uses the adapter's rank).
    client_batch_sizes: per-client batch sizes, client i gets entry i mod length (empty: train.batch_size).
    server_learning_rate: the global adapter moves by this multiple of the aggregated update (FedOpt's
        server step, Reddi et al., 2021; 1: plain FedAvg). Averaging n clients' local steps moves the
        model about as far as one client's steps; > 1 recovers part of the distance the pooled data
        would have travelled. Not with `flora`, whose global state is a growing stack.
    """

    num_clients: int = 3
    rounds: int = 3
    min_clients: int | None = None
    partition: PartitionScheme = PartitionScheme.IID
    dirichlet_alpha: float = 1.0
    engine: Engine = Engine.SIMULATION
    max_update_norm_ratio: float = 10.0
    client_timeout_seconds: float | None = None
    strategy: StrategyName = StrategyName.FEDAVG
    proximal_mu: float = 0.0
    ties_density: float = 0.2
    ties_scale: float = 1.0
    client_lora_ranks: list[int] = field(default_factory=list)
    client_batch_sizes: list[int] = field(default_factory=list)
    server_learning_rate: float = 1.0

    def __post_init__(self) -> None:
        if self.num_clients < 1 or self.rounds < 1:
            raise ConfigError("federation.num_clients and federation.rounds must be >= 1")
        if self.min_clients is not None and not 1 <= self.min_clients <= self.num_clients:
            raise ConfigError("federation.min_clients must be between 1 and num_clients")
        if len(set(self.client_lora_ranks)) > 1 and self.strategy is not StrategyName.FLORA:
            raise ConfigError("federation.client_lora_ranks with different ranks needs strategy: flora")
        if any(r < 1 for r in self.client_lora_ranks) or any(b < 1 for b in self.client_batch_sizes):
            raise ConfigError("federation.client_lora_ranks and client_batch_sizes must be >= 1")
        if not 0 < self.ties_density <= 1 or self.ties_scale <= 0:
            raise ConfigError("federation.ties_density must be in (0, 1] and ties_scale > 0")
        if self.server_learning_rate <= 0:
            raise ConfigError(f"federation.server_learning_rate must be > 0, got {self.server_learning_rate}")
        if self.server_learning_rate != 1 and self.strategy is StrategyName.FLORA:
            raise ConfigError("federation.server_learning_rate must be 1 with strategy: flora (a stacked state)")

    def client_rank(self, client: int) -> int | None:
        return self.client_lora_ranks[client % len(self.client_lora_ranks)] if self.client_lora_ranks else None

    def client_batch_size(self, client: int, default: int) -> int:
        return self.client_batch_sizes[client % len(self.client_batch_sizes)] if self.client_batch_sizes else default

    @property
    def required_replies(self) -> int:
        return self.num_clients if self.min_clients is None else self.min_clients


@dataclass
class EvalConfig:
    """Evaluation on the task's test split (or its validation split, to choose between variants).

    split: `test`, or `validation` while variants are compared (the test split is then scored once,
        with the chosen setting).
    limit: evaluate on the first `limit` examples of the split (None: all).
    batch_size: examples per forward pass.
    length_normalized: score options by log-likelihood per character (acc_norm).
    every_round: evaluate the plugged-in LLM after every round (else only after the last).
    round_limit: the rounds before the last score only the first `round_limit` of those examples (their
        trend, at less cost); the last round, the run's result, always scores all of them. None: all.
    max_new_tokens: generation tasks (GSM8K): tokens generated per answer at most.
    """

    split: str = "test"
    limit: int | None = 200
    batch_size: int = 32
    length_normalized: bool = False
    every_round: bool = True
    max_new_tokens: int = 256
    round_limit: int | None = None

    def __post_init__(self) -> None:
        for name in ("limit", "batch_size", "max_new_tokens", "round_limit"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value!r}")
        if self.split not in ("test", "validation"):
            raise ValueError(f"eval.split must be 'test' or 'validation', got {self.split!r}")

    def evaluator(self, task: TaskData, progress: bool = True) -> TaskEvaluator:
        if self.split == "validation":  # the evaluator scores `test`: point it at the validation split
            task = dataclasses.replace(task, test=task.validation)
        return TaskEvaluator(
            task, self.limit, self.batch_size, self.length_normalized, self.max_new_tokens, progress, self.round_limit
        )


@dataclass
class BaselineConfig:
    """Reference rows: what the federation's result is measured against.

    centralized: the adapter trained on the full LLM with all clients' data pooled, as many examples
        as the whole federation saw (upper bound).
    local_only: the method's client side trained on client 0's data alone, with one federated client's
        compute (rounds x steps; lower bound).
    cache: reuse a row computed before with the same inputs (`blindtune.reference_rows`).
    """

    centralized: bool = True
    local_only: bool = True
    cache: bool = True


@dataclass
class RunConfig:
    """One runnable setting; `method_config` is the method's own section (named after the method).

    task: a registered task name, a user's .jsonl/.csv file, or a folder of user split files
        (train.jsonl, test.jsonl, optionally validation.jsonl; see `blindtune.data.load_task`).
    task_template / choice_prefix: for a user's rows only: the prompt is `task_template` with `{text}`
        replaced by the row's text, each option is scored as `choice_prefix + option`. Defaults:
        `"{text}\nAnswer:"` and one space, e.g. `task_template: "Definition: {text}\nCategory:"`.
    """

    method: str
    model: str = DEFAULT_MODEL
    task: str = "wordnet-supersense"
    data_dir: str | None = None
    task_template: str | None = None
    choice_prefix: str | None = None
    seed: int = 0
    federation: FederationConfig = field(default_factory=FederationConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    baselines: BaselineConfig = field(default_factory=BaselineConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    device: DeviceName = DeviceName.AUTO  # auto: CUDA when present, else the CPU
    bf16: bool = False  # bfloat16 weights (CUDA only; the CPU stays float32)
    method_config: Any = None

    def placement(self) -> Placement:
        """Where every party of this run computes (see `blindtune.models.device`)."""
        return resolve_placement(self.device, self.bf16)

    def __post_init__(self) -> None:
        if self.task_template is not None or self.choice_prefix is not None:
            if not is_user_task(self.task):
                raise ValueError(
                    f"task_template and choice_prefix apply to your own files; task {self.task!r} has its own prompts"
                )
            if self.task_template is not None:
                check_template(self.task_template)

    def load_task(self) -> TaskData:
        """The run's task, its user rows put to the model as `task_template` and `choice_prefix` say."""
        return load_task(self.task, self.data_dir, self.seed, self.task_template, self.choice_prefix)

    def to_dict(self) -> dict[str, Any]:
        data = _to_plain(self)
        data[self.method] = data.pop("method_config")
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    def content_hash(self) -> str:
        """A short hash of every setting that decides the run's results (each checkpoint carries it)."""
        kept = {key: value for key, value in flat_config(self.to_dict()).items() if key not in _NOT_HASHED}
        return hashlib.sha256(json.dumps(kept, sort_keys=True).encode()).hexdigest()[:16]


# Settings that change how a run is carried out, not what it computes: a resume may change them.
_NOT_HASHED = {"federation.engine"}


def flat_config(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """`{"train": {"steps": 5}}` -> `{"train.steps": 5}`."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(flat_config(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def config_differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """`key: old -> new` for every hashed setting that differs between two configs' `to_dict()`s."""
    a, b = flat_config(old), flat_config(new)
    return [
        f"{key}: {a.get(key)!r} -> {b.get(key)!r}"
        for key in sorted(set(a) | set(b))
        if key not in _NOT_HASHED and a.get(key) != b.get(key)
    ]


def run_config_from_dict(data: dict[str, Any], method_sections: MethodSections) -> RunConfig:
    """Build a RunConfig; the method's section is parsed with the dataclass `method_sections` names."""
    if not isinstance(data, dict) or "method" not in data:
        raise ConfigError("a run config is a mapping with at least a `method` key")
    method = str(data["method"])
    section_class = method_sections(method)
    data = dict(data)
    method_section = data.pop(method, {}) or {}
    config = from_dict(RunConfig, data)
    config.method_config = from_dict(section_class, method_section, path=method)
    return config


def load_run_config(
    path: str | Path,
    method_sections: MethodSections,
    overrides: dict[str, Any] | None = None,
    settings: Sequence[str] = (),
) -> RunConfig:
    """Load a config file; `overrides` (a nested mapping) and then `settings` (`KEY.PATH=VALUE`) win over it."""
    path = Path(path)
    data = merge(merge(load_config_data(path), overrides or {}), parse_settings(settings))
    try:
        return run_config_from_dict(data, method_sections)
    except (ConfigError, KeyError) as error:  # KeyError: an unknown method (UnknownMethodError)
        raise ConfigError(f"{path}: {error}") from error


PACKAGED_CONFIGS = "configs"  # folder of blindtune's product configs, shipped as package data
BASE_KEY = "base"  # a config file may name another one it changes: `base: offsite_wordnet_3clients_quick.yaml`


def packaged_config(name: str) -> Path:
    """A product config shipped in the package (`blindtune/configs/NAME`)."""
    return Path(str(resources.files("blindtune") / PACKAGED_CONFIGS / name))


def resolve_config(name: str | Path, directory: Path | None = None) -> Path:
    """`name` as a path (relative to `directory`, default the working directory) if that file exists, else
    the packaged config of that name, else the path (so the error names what was asked for)."""
    path = (directory or Path.cwd()) / Path(name).expanduser()
    if path.is_file():
        return path
    packaged = packaged_config(str(name))
    return packaged if packaged.is_file() else path


def load_config_data(path: str | Path, _chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The plain mapping a config file describes. A file with `base: OTHER.yaml` is that config (a path
    relative to the file, or a packaged config's name) with the file's other keys merged over it."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as error:
        raise ConfigError(f"cannot read {path}: {error}") from error
    except yaml.YAMLError as error:
        raise ConfigError(f"{path} is not valid YAML: {error}") from error
    data = data or {}
    if not isinstance(data, dict):
        kind = type(data).__name__
        raise ConfigError(f"{path}: the top level must be a mapping (method: ..., task: ...), got a {kind}")
    if BASE_KEY not in data:
        return data
    data = dict(data)
    base = data.pop(BASE_KEY)
    if not isinstance(base, str) or not base:
        raise ConfigError(f"{path}: {BASE_KEY}: expected the name or path of a config file, got {base!r}")
    base_path = resolve_config(base, path.parent)
    chain = (*_chain, path.resolve())
    if base_path.resolve() in chain:
        raise ConfigError(f"{path}: {BASE_KEY}: {base} is based on this file (a cycle)")
    return merge(load_config_data(base_path, chain), data)


def parse_settings(settings: Sequence[str]) -> dict[str, Any]:
    """`["train.steps=40", "offsite.adapter.lora_rank=4"]` -> the nested mapping that `merge` applies. Values
    are YAML (`40`, `0.002`, `true`, `null`, `[2, 8]`, `simulation`), typed later by the strict conversion."""
    nested: dict[str, Any] = {}
    for setting in settings:
        key, equals, text = setting.partition("=")
        names = key.strip().split(".")
        if not equals or not all(name.strip() for name in names):
            raise ConfigError(f"--set {setting!r}: expected KEY.PATH=VALUE, e.g. train.steps=40")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as error:
            raise ConfigError(f"--set {setting!r}: the value is not valid YAML: {error}".splitlines()[0]) from error
        *parents, leaf = (name.strip() for name in names)
        level = nested
        for depth, name in enumerate(parents):
            level = level.setdefault(name, {})
            if not isinstance(level, dict):
                raise ConfigError(f"--set {setting!r}: {'.'.join(names[: depth + 1])} is already set to a value")
        level[leaf] = value
    return nested


def merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Recursive dict merge; values in `overrides` win."""
    merged = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def from_dict(cls: type[T], data: Any, path: str = "") -> T:
    """Strictly convert plain data into dataclass `cls`."""
    if not isinstance(data, dict):
        raise ConfigError(f"{path or 'config'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(fields))
    if unknown:
        names = ", ".join(f"{path}.{key}" if path else str(key) for key in unknown)
        raise ConfigError(f"unknown key(s) {names}; {path or 'config'} has {', '.join(sorted(fields))}")
    values = {name: _convert(hints[name], value, f"{path}.{name}" if path else name) for name, value in data.items()}
    try:
        return cls(**values)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"{path or 'config'}: {error}") from error


def _convert(hint: Any, value: Any, path: str) -> Any:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None:
            if len(options) < len(typing.get_args(hint)):
                return None
            raise ConfigError(f"{path}: may not be null")
        return _convert(options[0], value, path)
    if hint is Any:
        return value
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, path)  # type: ignore[arg-type]
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        try:
            return hint(value)
        except ValueError:
            choices = ", ".join(str(m.value) for m in hint)
            raise ConfigError(f"{path}: {value!r} is not one of {choices}") from None
    if origin in (list, tuple):
        if not isinstance(value, list):
            raise ConfigError(f"{path}: expected a list, got {type(value).__name__}")
        (item,) = typing.get_args(hint)[:1]
        return [_convert(item, v, f"{path}[{i}]") for i, v in enumerate(value)]
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (int, float, str, bool):
        if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
            raise ConfigError(f"{path}: expected {hint.__name__}, got {value!r}")
        return value
    raise ConfigError(f"{path}: unsupported config type {hint}")


def _to_plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _to_plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, list | tuple):
        return [_to_plain(v) for v in value]
    return value
