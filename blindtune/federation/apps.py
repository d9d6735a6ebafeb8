"""Flower ServerApp and ClientApp for any registered method, built from one RunConfig.

The apps are thin: the server app hands the Grid to the method's server side and writes what it
returns; the client app finds its private partition and local storage from its node config and
passes each message to the method's client side. Which engine runs them is `engine.py`'s business.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from blindtune.config import RunConfig
from blindtune.data import Example, load_task
from blindtune.data.partition import partition
from blindtune.federation.adapter_rounds import TRAINED_IDS_FILE
from blindtune.federation.engine import NUM_PARTITIONS, PARTITION_ID
from blindtune.federation.records import MessageKind
from blindtune.federation.rounds import Exchange
from blindtune.methods import get_method
from blindtune.methods.base import ClientRun, ServerRun
from blindtune.privacy.accountant import reset_accountant
from blindtune.privacy.audit import server_privacy_results
from blindtune.privacy.context import ServerPrivacy, client_privacy, server_privacy
from blindtune.privacy.ledger_check import TrafficAudit
from blindtune.privacy.secagg import client_mods

log = logging.getLogger(__name__)

FEDERATION_RESULT = "federation.json"


def client_partitions(config: RunConfig) -> list[list[Example]]:
    """Every client's private train examples (each client computes only its own in a real run)."""
    task = load_task(config.task, config.data_dir, seed=config.seed)
    federation = config.federation
    return partition(task.train, federation.num_clients, federation.partition, federation.dirichlet_alpha, config.seed)


def build_apps(
    config: RunConfig, out_dir: Path, progress: bool = True, resume: bool = False
) -> tuple[ServerApp, ClientApp]:
    method = get_method(config.method)
    server_app = ServerApp()
    client_app = ClientApp()

    @server_app.main()
    def server_main(grid: Grid, context: Context) -> None:
        # The ledger check reads every reply the server receives, whichever code path sends it.
        traffic = TrafficAudit(grid) if config.privacy.audit.ledger else None
        exchange = Exchange(traffic or grid, timeout_seconds=config.federation.client_timeout_seconds)
        policy: ServerPrivacy | None = None
        try:
            with server_privacy(config.privacy) as policy:
                result = method.server(ServerRun(config, exchange, out_dir, progress, resume))
            result["status"] = "completed"
        except Exception as error:  # record why the run stopped, then let the engine see the error
            result = {"status": "failed", "error": f"{type(error).__name__}: {error}"}
            raise
        finally:
            result["cost"] = exchange.ledger.to_dict()
            result["failures"] = [f.to_dict() for f in exchange.failures]
            result.update(server_privacy_results(config, method, policy, traffic))
            (out_dir / FEDERATION_RESULT).write_text(json.dumps(result, indent=2))

    def handle(message: Message, context: Context) -> Message:
        partition_id = int(context.node_config[PARTITION_ID])
        num_partitions = int(context.node_config[NUM_PARTITIONS])
        if num_partitions != config.federation.num_clients:
            raise ValueError(
                f"node config says {num_partitions} partitions, run config {config.federation.num_clients}"
            )
        workdir = out_dir / "clients" / f"client-{partition_id}"
        workdir.mkdir(parents=True, exist_ok=True)
        examples = client_partitions(config)[partition_id][: config.privacy.audit.limit_client_examples]
        run = ClientRun(config=config, partition_id=partition_id, examples=examples, workdir=workdir)
        kind = MessageKind(message.metadata.message_type)
        if kind is MessageKind.SETUP and not resume:
            reset_accountant(workdir)  # a new run: its privacy accounting starts from zero
            (workdir / TRAINED_IDS_FILE).unlink(missing_ok=True)  # and so does its record of what it trained on
        with client_privacy(config.privacy, workdir, config.federation.rounds):
            reply = method.client(kind, message.content, run)
        return Message(reply, reply_to=message)

    client_app.query("setup")(handle)
    client_app.train(mods=client_mods(config.privacy.secagg))(handle)
    return server_app, client_app
