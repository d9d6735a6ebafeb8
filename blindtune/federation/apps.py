"""Flower ServerApp and ClientApp for any federated method, built from one RunConfig.

The apps are thin: the server app hands the Grid to the method's server side and writes what it
returns; the client app finds its private partition and local storage from its node config and
passes each message to the method's client side. The method (and anything that reads the server's
traffic, such as the run level's ledger check) is handed in by the caller; which engine runs the
apps is `engine.py`'s business.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from blindtune.config import RunConfig
from blindtune.data import Example, load_task
from blindtune.data.partition import partition
from blindtune.data.task import is_user_task
from blindtune.federation.adapter_rounds import TRAINED_IDS_FILE
from blindtune.federation.engine import DATA, NUM_PARTITIONS, PARTITION_ID
from blindtune.federation.records import MessageKind
from blindtune.federation.rounds import Exchange
from blindtune.federation.secagg import client_mods
from blindtune.models.device import placed
from blindtune.privacy.accountant import reset_accountant
from blindtune.privacy.context import ServerPrivacy, client_privacy, server_privacy

log = logging.getLogger(__name__)

FEDERATION_RESULT = "federation.json"


@dataclass
class ServerRun:
    """What a method's server side gets: the config, the message exchange and where to write."""

    config: RunConfig
    exchange: Exchange
    out_dir: Path
    progress: bool = True
    resume: bool = False  # continue after the last complete round checkpointed in out_dir


@dataclass
class ClientRun:
    """What a method's client side gets: the config, its private examples and its local storage."""

    config: RunConfig
    partition_id: int
    examples: list[Example]
    workdir: Path


@dataclass
class ServerResult:
    """What a method's server side returns for results.json.

    metrics: accuracies and the like, one number each (`plugin`: the final adapted model's).
    history: one row per round. clients: one row per client reply.
    privacy: the method's own privacy figures, lifted into results.json's `privacy` section (FedCoT's
        text-privatisation budget; OT's and LLEOT's emulator leakage under `emulator`).
    details: anything else the method reports (e.g. how its emulator was built), under `details`.
    """

    metrics: dict[str, float]
    history: list[dict[str, Any]]
    clients: list[dict[str, Any]]
    privacy: dict[str, Any] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)


class FederatedMethod(Protocol):
    """The two sides of a method the apps run."""

    def server(self, run: ServerRun) -> ServerResult: ...

    def client(self, kind: MessageKind, content: RecordDict, run: ClientRun) -> RecordDict: ...


class TrafficWatch(Protocol):
    """Reads everything the server receives (the run level's ledger check); one per server run."""

    def watch(self, grid: Grid) -> Grid:
        """The grid the server uses instead of `grid`."""
        ...

    def findings(self) -> dict[str, Any]:
        """What it found, written to federation.json as `ledger_check`."""
        ...


@dataclass
class FederationRecord:
    """federation.json: how the federation ended and what its server recorded.

    result: the method's (None when the run failed). server_privacy: what the server's protections
    reported (`secagg`, `server_dp`). ledger_check: the traffic watch's findings, if one watched.
    """

    status: str
    cost: dict[str, Any]
    failures: list[dict[str, Any]]
    result: ServerResult | None = None
    error: str | None = None
    server_privacy: dict[str, Any] = field(default_factory=dict)
    ledger_check: dict[str, Any] | None = None

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)

    @classmethod
    def read(cls, path: Path) -> FederationRecord:
        data = json.loads(path.read_text())
        result = data.pop("result")
        return cls(**data, result=None if result is None else ServerResult(**result))


def client_partitions(config: RunConfig) -> list[list[Example]]:
    """Every client's private train examples (each client computes only its own in a real run)."""
    task = config.load_task()
    federation = config.federation
    return partition(task.train, federation.num_clients, federation.partition, federation.dirichlet_alpha, config.seed)


def own_examples(config: RunConfig, path: Path) -> list[Example]:
    """A client organisation's own train examples: the train (and validation) rows of `path`, files in
    the format of the run's task. For a registered task, what its `data_dir` holds (e.g. gsm8k's
    train.jsonl/test.jsonl); for a task given as files, a .jsonl/.csv file or a folder like them (a
    single file is split 80/10/10 as everywhere: its test tenth is not trained on)."""
    if not path.exists():
        raise FileNotFoundError(f"this client's data {path} does not exist")
    if is_user_task(config.task):
        task = load_task(str(path), None, config.seed, config.task_template, config.choice_prefix)
    else:
        task = load_task(config.task, path, config.seed)
    return [*task.train, *task.validation]


def build_apps(
    config: RunConfig,
    method: FederatedMethod,
    out_dir: Path,
    progress: bool = True,
    resume: bool = False,
    traffic_watch: Callable[[], TrafficWatch] | None = None,
) -> tuple[ServerApp, ClientApp]:
    """The apps that run `method`; `traffic_watch()` makes the watch of each server run, if given."""
    server_app = ServerApp()
    client_app = ClientApp()

    @server_app.main()
    def server_main(grid: Grid, context: Context) -> None:
        # A watch of the traffic reads every reply the server receives, whichever code path sends it.
        watch = traffic_watch() if traffic_watch is not None else None
        exchange = Exchange(
            watch.watch(grid) if watch is not None else grid, timeout_seconds=config.federation.client_timeout_seconds
        )
        policy: ServerPrivacy | None = None
        record = FederationRecord(status="failed", cost={}, failures=[], error="the server stopped without a result")
        try:
            with placed(config.placement()), server_privacy(config.privacy) as policy:
                record.result = method.server(ServerRun(config, exchange, out_dir, progress, resume))
            record.status, record.error = "completed", None
        except KeyboardInterrupt:  # Ctrl-C: what finished is in the checkpoints
            record.status, record.error = "interrupted", "interrupted by the user"
            raise
        except Exception as error:  # record why the run stopped, then let the engine see the error
            record.error = f"{type(error).__name__}: {error}"
            raise
        finally:
            record.cost = exchange.ledger.to_dict()
            record.failures = [f.to_dict() for f in exchange.failures]
            if policy is not None:
                record.server_privacy = policy.report
            if watch is not None:
                record.ledger_check = watch.findings()
            (out_dir / FEDERATION_RESULT).write_text(record.to_json())

    def handle(message: Message, context: Context) -> Message:
        partition_id = int(context.node_config[PARTITION_ID])
        num_partitions = int(context.node_config[NUM_PARTITIONS])
        if num_partitions != config.federation.num_clients:
            raise ValueError(
                f"node config says {num_partitions} partitions, run config {config.federation.num_clients}"
            )
        workdir = out_dir / "clients" / f"client-{partition_id}"
        workdir.mkdir(parents=True, exist_ok=True)
        own_data = context.node_config.get(DATA)
        examples = own_examples(config, Path(str(own_data))) if own_data else client_partitions(config)[partition_id]
        examples = examples[: config.privacy.audit.limit_client_examples]
        run = ClientRun(config=config, partition_id=partition_id, examples=examples, workdir=workdir)
        kind = MessageKind(message.metadata.message_type)
        if kind is MessageKind.SETUP and not resume:
            reset_accountant(workdir)  # a new run: its privacy accounting starts from zero
            (workdir / TRAINED_IDS_FILE).unlink(missing_ok=True)  # and so does its record of what it trained on
        with placed(config.placement()), client_privacy(config.privacy, workdir, config.federation.rounds):
            reply = method.client(kind, message.content, run)
        return Message(reply, reply_to=message)

    client_app.query("setup")(handle)
    client_app.train(mods=client_mods(config.privacy.secagg))(handle)
    return server_app, client_app
