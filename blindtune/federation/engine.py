"""The one seam between blindtune and Flower's engines.

Everything else in blindtune talks to Flower through a `ServerApp`, a `ClientApp` and the `Grid`
handed to the server; *which* engine moves the messages is decided here alone:

- `simulation`: Flower's simulation engine (Ray actors, one virtual SuperNode per client);
- `inprocess`: a `Grid` that hands each message straight to the ClientApp in this process. Same
  apps, same records, no Ray start-up (~12 s here): for unit tests and quick single-process runs.

A real deployment (a SuperLink and one SuperNode per client as processes, `deployment.py`) is not an
engine of these apps: each process rebuilds its apps from the run config (`flower_app.py`), and
`blindtune launch` hands the runner that federation instead of this one.

Flower 1.42 deprecates `run_simulation` for `flwr run` on a local SuperLink; when we move, only this
file changes.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from typing import Any
from uuid import uuid4

import psutil
from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.proto.node_pb2 import NodeInfo
from flwr.serverapp import Grid, ServerApp
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

from blindtune.federation.rounds import clear_stop, request_stop

log = logging.getLogger(__name__)

PARTITION_ID = "partition-id"
NUM_PARTITIONS = "num-partitions"


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
    server_app: ServerApp, client_app: ClientApp, num_clients: int, engine: Engine, gpu: bool = False
) -> None:
    """Run the apps to completion on the chosen engine; with `gpu`, simulated clients share the GPU."""
    if engine is Engine.INPROCESS:
        # Flower stamps messages with the identity of the running task; its engines set it, so do we.
        TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 0, 0, SUPERLINK_NODE_ID
        grid = InProcessGrid(client_app, num_clients)
        context = Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config={})
        server_app(grid, context)
        return
    from flwr.simulation import run_simulation

    started = time.perf_counter()
    clear_stop()
    # One CPU per virtual client: clients then train one after another on a 2-core machine instead of
    # fighting over cores, and never all sit in memory at once.
    children: list[Any] = []
    try:
        with _ctrl_c_remembers_children(children):
            run_simulation(
                server_app=server_app,
                client_app=client_app,
                num_supernodes=num_clients,
                backend_config={
                    "client_resources": {
                        "num_cpus": max(1, (os.cpu_count() or 2) // 2),
                        # An equal share each: Ray then runs them side by side on the one GPU.
                        "num_gpus": 1.0 / num_clients if gpu else 0.0,
                    },
                    "init_args": {
                        "logging_level": logging.getLogger("ray").getEffectiveLevel(),
                        "log_to_driver": log.isEnabledFor(logging.INFO),
                    },
                },
                verbose_logging=log.isEnabledFor(logging.DEBUG),
            )
    except KeyboardInterrupt:
        _stop_simulation(children)
        raise
    log.info("simulation finished in %.1f s", time.perf_counter() - started)


@contextlib.contextmanager
def _ctrl_c_remembers_children(children: list[Any]) -> Iterator[None]:
    """Ctrl-C raises KeyboardInterrupt as usual, after noting this process's descendants (Ray's
    processes): Flower shuts Ray down before we see the interrupt, and its workers outlive that."""
    # Only where Ctrl-C means KeyboardInterrupt (not in another thread, nor under nohup, which ignores it).
    if threading.current_thread() is not threading.main_thread() or (
        signal.getsignal(signal.SIGINT) is not signal.default_int_handler
    ):
        yield
        return

    def handler(signum: int, frame: object) -> None:
        with contextlib.suppress(Exception):
            children.extend(psutil.Process().children(recursive=True))
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _stop_simulation(children: list[Any], grace_seconds: float = 5.0) -> None:
    """After Ctrl-C: Flower has stopped the Ray backend, but its ServerApp thread still waits for
    replies that never come, and the interpreter would wait for it forever. Tell it to stop, give it
    `grace_seconds` to write what it has, then make sure no Ray process is left."""
    request_stop()
    deadline = time.monotonic() + grace_seconds
    for thread in leftover_threads():
        thread.join(timeout=max(0.0, deadline - time.monotonic()))
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()
    _, alive = psutil.wait_procs(children, timeout=grace_seconds)
    for process in alive:
        with contextlib.suppress(psutil.Error):
            process.kill()
    log.debug("after Ctrl-C: threads still running %s", [t.name for t in leftover_threads()])


def leftover_threads() -> list[threading.Thread]:
    """Threads that would keep the interpreter from exiting (a server still finishing a round)."""
    return [t for t in threading.enumerate() if t is not threading.main_thread() and not t.daemon and t.is_alive()]
