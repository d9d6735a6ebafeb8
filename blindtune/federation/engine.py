"""The one seam between blindtune and Flower's engines.

Everything else in blindtune talks to Flower through a `ServerApp`, a `ClientApp` and the `Grid`
handed to the server; *which* engine moves the messages is decided here alone:

- `simulation`: Flower's simulation runtime, as Flower 1.42 runs it (`flwr run` on a local
  `flower-superlink --simulation`, one virtual SuperNode per client as a Ray actor). The SuperLink
  runs the deployed Flower App (`blindtune.runner:server_app` / `client_app`), which rebuilds the
  same apps from the run config, in its own processes (`deployment.py` starts and stops them);
- `inprocess`: a `Grid` that hands each message straight to the ClientApp in this process. Same
  apps, same records, no processes to start: for unit tests and quick single-process runs.

A real deployment (a SuperLink and one SuperNode per client as processes, `deployment.py`) is
`blindtune launch`, which hands the runner that federation instead of this one.
"""

from __future__ import annotations

import enum
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING
from uuid import uuid4

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.proto.node_pb2 import NodeInfo
from flwr.serverapp import Grid, ServerApp
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

if TYPE_CHECKING:
    from blindtune.config import RunConfig
    from blindtune.federation.deployment import AppComponents, SimulatedNodes

log = logging.getLogger(__name__)

# Node config keys: which private slice of the task a (virtual) SuperNode's organisation holds.
PARTITION_ID = "partition-id"
NUM_PARTITIONS = "num-partitions"
DATA = "data"  # the organisation's own files (a deployment's SuperNode), instead of its simulated slice

# (config, out_dir, progress, resume) -> the ServerApp and ClientApp that run it in this process.
AppsBuilder = Callable[["RunConfig", Path, bool, bool], tuple[ServerApp, ClientApp]]


class Engine(enum.StrEnum):
    SIMULATION = "simulation"
    INPROCESS = "inprocess"


class InProcessGrid(Grid):
    """A Grid whose nodes are ClientApp calls in this process, one `Context` (and state) per node.

    A ClientApp exception becomes an error reply, as Flower's engines report a crashed client.
    """

    def __init__(self, client_app: ClientApp, num_nodes: int, run_config: dict | None = None) -> None:
        self._client_app = client_app
        self._contexts = {
            node_id: Context(
                run_id=0,
                node_id=node_id,
                node_config={PARTITION_ID: partition, NUM_PARTITIONS: num_nodes},
                state=RecordDict(),
                run_config=dict(run_config or {}),
            )
            for partition, node_id in enumerate(range(1001, 1001 + num_nodes))
        }
        self._replies: dict[str, Message] = {}

    def set_run(self, run: object) -> None:  # the in-process grid serves exactly one run
        return None

    @property
    def run(self) -> Run:
        raise NotImplementedError("the in-process grid has no Run object")

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self._contexts)

    def get_nodes(self) -> Iterable[NodeInfo]:
        raise NotImplementedError("use get_node_ids")

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for message in messages:
            message_id = str(uuid4())
            message.metadata.__dict__["_message_id"] = message_id
            context = self._contexts[message.metadata.dst_node_id]
            try:
                reply = self._client_app(message, context)
            except Exception as error:  # a crashing client must not take the server down
                log.warning("client node %s failed: %r", message.metadata.dst_node_id, error)
                reply = Message(Error(code=0, reason=f"{type(error).__name__}: {error}"), reply_to=message)
            self._replies[message_id] = reply
            ids.append(message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._replies.pop(i) for i in message_ids if i in self._replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return self.pull_messages(self.push_messages(messages))


def run_federation(
    config: RunConfig,
    out_dir: Path,
    resume: bool,
    build: AppsBuilder,
    deployed_app: AppComponents,
    progress: bool = True,
) -> None:
    """Run the federation of `config` to completion on `config.federation.engine`.

    `build` makes the apps for the in-process engine; the simulation runtime's processes load
    `deployed_app`, which must rebuild the same apps from the run config.
    """
    if config.federation.engine is Engine.INPROCESS:
        server_app, client_app = build(config, out_dir, progress, resume)
        # Flower stamps messages with the identity of the running task; its engines set it, so do we.
        TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 0, 0, SUPERLINK_NODE_ID
        grid = InProcessGrid(client_app, config.federation.num_clients)
        context = Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config={})
        server_app(grid, context)
        return
    # Imported here: the deployment module reads the run config, which names this module's engines.
    from blindtune.federation.deployment import DeploymentOptions, run_deployment

    started = time.perf_counter()
    nodes = simulated_nodes(config.federation.num_clients, config.placement().gpu)
    run_deployment(config, out_dir, deployed_app, DeploymentOptions(simulation=nodes, app_progress=progress), resume)
    log.info("simulation finished in %.1f s", time.perf_counter() - started)


def simulated_nodes(num_clients: int, gpu: bool) -> SimulatedNodes:
    """Every virtual client at once, each on an equal share of the cores (at least one thread).

    Ray runs as many clients side by side as its CPU count allows, in waves. With more clients than
    cores (3 on 2) the last wave would leave cores idle for a whole client's training, so Ray is told
    of one CPU per client, up to two per core (each running client holds a model copy): they then
    share the cores. With a GPU, an equal share of it each."""
    from blindtune.federation.deployment import SimulatedNodes

    cores = os.cpu_count() or 2
    return SimulatedNodes(
        cpus=max(1, cores // num_clients),
        gpus=1.0 / num_clients if gpu else 0.0,
        total_cpus=max(cores, min(num_clients, 2 * cores)),
    )


def leftover_threads() -> list[threading.Thread]:
    """Threads that would keep the interpreter from exiting (a server still finishing a round)."""
    return [t for t in threading.enumerate() if t is not threading.main_thread() and not t.daemon and t.is_alive()]
