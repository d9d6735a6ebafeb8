"""A warm ClientApp process for a SuperNode: one long-lived process runs every message the node gets.

Flower 1.42 runs each message a SuperNode receives in a new `flwr-clientapp` process (the default
`--isolation subprocess`): every message pays the imports (torch, transformers) and rebuilds the
client's model from disk. With `flower-supernode --isolation process` the SuperNode instead waits
for an executor of its own to take each task from its runtime API (`--host`/`--port`); this module
is that executor. It takes the node's ClientApp tasks one after another and runs each in this
process, speaking Flower's runtime protocol with Flower's own functions (those `flwr-clientapp`
uses), so imports, the built apps and what a client keeps in memory (its hand-out, keyed by content
hash: `models.artefact`) stay warm between messages. Work directories still hold everything that
must survive a restart: a restarted worker rebuilds from them.

    python -m blindtune.federation.warm_client --runtime-api-address 127.0.0.1:9094 --insecure

`blindtune launch` and `blindtune supernode` start one next to each SuperNode.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from flwr.app import Context, Error, Message
from flwr.cli.install import install_from_fab
from flwr.clientapp import ClientApp
from flwr.clientapp.utils import get_load_client_app_fn
from flwr.common.constant import ErrorCode, SubStatus
from flwr.proto.runtime_pb2 import AcquireTaskRequest
from flwr.supercore.constant import TaskType
from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor
from flwr.supercore.protobuf.client import ProtobufClientInterceptor
from flwr.supercore.retry import make_simple_http_retry_invoker
from flwr.supercore.runtime import RuntimeHttpClient
from flwr.supernode.runtime.run_clientapp import pull_task_input, push_message, push_task_output

log = logging.getLogger("blindtune.federation.warm_client")  # also when run as __main__


@dataclass(frozen=True)
class RuntimeApi:
    """Where a SuperNode's runtime API listens, and how to trust it."""

    address: str
    root_certificates: bytes | None = None  # None: plain HTTP (`--insecure`)

    def client(self, *interceptors: ProtobufClientInterceptor) -> RuntimeHttpClient:
        return RuntimeHttpClient.from_server_address(
            server_address=self.address,
            insecure=self.root_certificates is None,
            root_certificates=self.root_certificates,
            interceptors=list(interceptors),
            retry_invoker=make_simple_http_retry_invoker(),
        )


class WarmClient:
    """Takes a SuperNode's ClientApp tasks and runs each in this process; apps load once per FAB."""

    def __init__(self, runtime: RuntimeApi) -> None:
        self.runtime = runtime
        self._apps: dict[str, ClientApp] = {}

    def serve(self, stop: threading.Event, poll_seconds: float = 0.05) -> None:
        """Run tasks until `stop` is set."""
        acquirer = self.runtime.client(RuntimeVersionHttpInterceptor(component_name="SuperExec"))
        try:
            while not stop.is_set():
                reply = acquirer.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP]))
                if reply.HasField("task") and reply.token:
                    self.run_task(reply.token, reply.task.task_id)
                else:
                    stop.wait(poll_seconds)
        finally:
            acquirer.close()

    def run_task(self, token: str, task_id: int) -> None:
        """What `flwr-clientapp` does for its one task, with the ClientApp this process already loaded."""
        taken = time.perf_counter()
        client = self.runtime.client(
            RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"), RuntimeTokenHttpInterceptor(token)
        )
        heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(client))
        heartbeat.start()
        message: Message | None = None
        context: Context | None = None
        reply: Message | None = None
        status, details = SubStatus.FAILED, "ClientApp task failed"
        try:
            message, context, run, fab = pull_task_input(client)
            client_app = self._client_app(fab.hash_str, fab.content, run.fab_id, run.fab_version)
            started = time.perf_counter()
            reply = client_app(message=message, context=context)
            status, details = SubStatus.COMPLETED, ""
            log.info(
                "task %d (%s): ClientApp started %.2f s after the task was taken, ran %.1f s",
                task_id,
                message.metadata.message_type,
                started - taken,
                time.perf_counter() - started,
            )
        except Exception as error:  # the node answers with an error and this process takes the next task
            log.exception("ClientApp raised an exception")
            details = f"{type(error)}:<'{error}'>"
            if message is not None:
                reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=details), reply_to=message)
        finally:
            try:
                if reply is not None and context is not None:
                    push_message(client, reply, context)
            finally:
                push_task_output(client, context, status, details)
                heartbeat.stop()
                client.close()

    def _client_app(self, fab_hash: str, fab_content: bytes, fab_id: str, fab_version: str) -> ClientApp:
        if fab_hash not in self._apps:
            install_from_fab(fab_content, skip_prompt=True)
            load: Callable[[str, str, str], ClientApp] = get_load_client_app_fn("", None, multi_app=True)
            self._apps[fab_hash] = load(fab_id, fab_version, fab_hash)
        return self._apps[fab_hash]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="A warm ClientApp process for a `--isolation process` SuperNode.")
    parser.add_argument("--runtime-api-address", required=True, help="the SuperNode's --host:--port")
    trust = parser.add_mutually_exclusive_group(required=True)
    trust.add_argument("--insecure", action="store_true", help="the runtime API is plain HTTP")
    trust.add_argument("--root-certificates", type=Path, help="CA certificate (PEM) of the runtime API's TLS")
    args = parser.parse_args(argv)
    handler = logging.StreamHandler()  # blindtune's lines; Flower's logger prints its own
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger("blindtune").addHandler(handler)
    logging.getLogger("blindtune").setLevel(logging.INFO)
    certificates = None if args.insecure else args.root_certificates.read_bytes()
    log.info("warm ClientApp process serving the SuperNode at %s", args.runtime_api_address)
    # Ctrl-C and SIGTERM (its default action) end it at once: the work directories hold what must survive.
    with contextlib.suppress(KeyboardInterrupt):
        WarmClient(RuntimeApi(args.runtime_api_address, certificates)).serve(threading.Event())


if __name__ == "__main__":
    main()
