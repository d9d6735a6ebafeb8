"""The Flower App that SuperLinks and SuperNodes load, generic over what builds a run's apps.

`DeployedApps(method_sections, build)` gives the `server_app` / `client_app` pair; the run level
makes the one blindtune ships (`blindtune.runner:server_app` / `client_app`), with the method and
the audits it assembles. In a deployment the apps cannot be built in advance, because the run's
`RunConfig` only arrives with the run: it travels in the run config (`[tool.flwr.app.config]` in
pyproject.toml, overridden by `flwr run --run-config`), so every process rebuilds the same apps with
`build` from its `Context`. Run config keys:

- `blindtune-config`: a `RunConfig.to_json()` string; when empty, `config-file` is loaded instead;
- `config-file`: a run config YAML: a path, or the name of a config packaged in `blindtune/configs/`;
- `out-dir`: where the server writes `federation.json`, checkpoints and the clients their state;
- `progress`: show progress bars in the app processes' logs;
- `resume`: continue the interrupted run in `out-dir` after its last complete round;
- `wait-for-nodes-seconds`: how long the server waits for all `num_clients` SuperNodes to connect;
- `clients-from-federation`: one client per SuperNode of a simulated federation (`flwr run .` on
  Flower's default local simulation, whatever its size), instead of `federation.num_clients`.
  Without it, a simulated federation with too few SuperNodes fails at once, saying how to resize it.

Node config keys (`flower-supernode --node-config`): `partition-id` and `num-partitions` (which
private slice of the task this organisation holds) and, optionally, `workdir`, the node's own
storage (default: the run's `out-dir`).
"""

from __future__ import annotations

import functools
import json
import logging
import time
from pathlib import Path

import psutil
from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.superlink.grid.inmemory_grid import InMemoryGrid

from blindtune.config import (
    ConfigError,
    MethodSections,
    RunConfig,
    load_run_config,
    resolve_config,
    run_config_from_dict,
)
from blindtune.federation.apps import FEDERATION_RESULT
from blindtune.federation.engine import NUM_PARTITIONS, AppsBuilder

log = logging.getLogger(__name__)
_flower_log = logging.getLogger("flwr")  # a ClientApp process shows only Flower's logger's lines

CONFIG_JSON = "blindtune-config"
CONFIG_FILE = "config-file"
OUT_DIR = "out-dir"
PROGRESS = "progress"
RESUME = "resume"
WAIT_FOR_NODES = "wait-for-nodes-seconds"
CLIENTS_FROM_FEDERATION = "clients-from-federation"
WORKDIR = "workdir"

DEFAULT_WAIT_FOR_NODES_SECONDS = 300.0


def run_config_entries(
    config: RunConfig,
    out_dir: Path,
    progress: bool = False,
    wait_for_nodes_seconds: float | None = None,
    resume: bool = False,
) -> dict[str, str | bool | float]:
    """The Flower run config that makes the deployed apps run `config` and write to `out_dir`."""
    entries: dict[str, str | bool | float] = {
        CONFIG_JSON: config.to_json(),
        OUT_DIR: str(out_dir.resolve()),
        PROGRESS: progress,
        RESUME: resume,
    }
    if wait_for_nodes_seconds is not None:
        entries[WAIT_FOR_NODES] = float(wait_for_nodes_seconds)
    return entries


def config_from_run_config(run_config: dict, method_sections: MethodSections) -> RunConfig:
    """The `RunConfig` a Flower run config carries (inline JSON first, else the YAML file it names)."""
    inline = str(run_config.get(CONFIG_JSON, "") or "")
    if inline:
        try:
            data = json.loads(inline)
        except json.JSONDecodeError as error:
            raise ConfigError(f"run config `{CONFIG_JSON}` is not valid JSON: {error}") from error
        return run_config_from_dict(data, method_sections)
    name = str(run_config.get(CONFIG_FILE, "") or "")
    if not name:
        raise ConfigError(f"the Flower run config sets neither `{CONFIG_JSON}` nor `{CONFIG_FILE}`")
    return load_run_config(resolve_config(name), method_sections)


def _out_dir(run_config: dict) -> Path:
    return Path(str(run_config.get(OUT_DIR, "") or "runs/flwr")).expanduser().resolve()


class FederationTooSmallError(RuntimeError):
    """A simulated federation has fewer SuperNodes than the run has clients."""


def outcome_line(out_dir: Path) -> str:
    """One line for the ServerApp's log (`flwr log`): how the federation ended, and where its record is."""
    path = out_dir / FEDERATION_RESULT
    if not path.is_file():
        return f"no {path} was written"
    record = json.loads(path.read_text())
    metrics = (record.get("result") or {}).get("metrics") or {}
    shown = ", ".join(f"{name} {value:.4g}" for name, value in metrics.items() if isinstance(value, int | float))
    return f"federation {record.get('status')}{f': {shown}' if shown else ''} ({path})"


def wait_for_nodes(grid: Grid, expected: int, timeout_seconds: float, poll_seconds: float = 1.0) -> list[int]:
    """Block until `expected` SuperNodes are connected; a TimeoutError names how many came."""
    deadline = time.monotonic() + timeout_seconds
    while True:
        node_ids = sorted(grid.get_node_ids())
        if len(node_ids) >= expected:
            return node_ids
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{len(node_ids)} of {expected} SuperNodes connected within {timeout_seconds:.0f} s")
        time.sleep(poll_seconds)


class DeployedApps:
    """The ServerApp and ClientApp a SuperLink and SuperNodes load: each rebuilds, with `build`, the
    apps of the run its `Context` belongs to (cached per config)."""

    def __init__(self, method_sections: MethodSections, build: AppsBuilder) -> None:
        self.method_sections = method_sections
        self._apps_builder = build
        self.server_app = ServerApp()
        self.server_app.main()(self._server_main)
        self.client_app = _RunConfiguredClientApp(self)

    def __getstate__(self) -> dict:
        # Flower's simulation runtime pickles the ClientApp to its Ray actors, once per message.
        return {"method_sections": self.method_sections, "build": self._apps_builder}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["method_sections"], state["build"])  # type: ignore[misc]

    def config_for(self, context: Context, num_clients: int | None = None) -> RunConfig:
        """The RunConfig of the run `context` belongs to; with `clients-from-federation`, for
        `num_clients` clients (the server: its SuperNodes; a client: its node's `num-partitions`)."""
        run_config = dict(context.run_config)
        config = config_from_run_config(run_config, self.method_sections)
        if num_clients is None and NUM_PARTITIONS in context.node_config:
            num_clients = int(context.node_config[NUM_PARTITIONS])
        if not run_config.get(CLIENTS_FROM_FEDERATION) or num_clients in (None, config.federation.num_clients):
            return config
        data = config.to_dict()
        data["federation"]["num_clients"] = num_clients
        return run_config_from_dict(data, self.method_sections)

    def apps_for(
        self, context: Context, out_dir: Path | None = None, config: RunConfig | None = None
    ) -> tuple[ServerApp, ClientApp]:
        """The ServerApp/ClientApp for the run `context` belongs to."""
        run_config = dict(context.run_config)
        config = config or self.config_for(context)
        directory = out_dir if out_dir is not None else _out_dir(run_config)
        progress, resume = bool(run_config.get(PROGRESS, False)), bool(run_config.get(RESUME, False))
        return _built_apps(self._apps_builder, self.method_sections, config.to_json(), str(directory), progress, resume)

    def _server_main(self, grid: Grid, context: Context) -> None:
        run_config = dict(context.run_config)
        config = config_from_run_config(run_config, self.method_sections)
        out_dir = _out_dir(run_config)
        out_dir.mkdir(parents=True, exist_ok=True)
        needed = config.federation.num_clients
        if isinstance(grid, InMemoryGrid):  # a simulated federation: all its SuperNodes are there from the start
            node_ids = sorted(grid.get_node_ids())
            if run_config.get(CLIENTS_FROM_FEDERATION):
                config = self.config_for(context, len(node_ids))
                if len(node_ids) != needed:
                    _flower_log.warning(
                        "blindtune: the config asks for %d clients; running with the federation's %d simulated "
                        "SuperNodes, one client each (for %d: flwr run . --federation-config num-supernodes=%d)",
                        needed,
                        len(node_ids),
                        needed,
                        needed,
                    )
            elif len(node_ids) < needed:
                error = (
                    f"the run needs {needed} SuperNodes and the simulated federation has {len(node_ids)}: "
                    f'run with --federation-config "num-supernodes={needed}", or with --run-config '
                    f'"{CLIENTS_FROM_FEDERATION}=true" for one client per SuperNode'
                )
                _flower_log.error("blindtune: %s", error)
                raise FederationTooSmallError(error)
        else:
            timeout = float(run_config.get(WAIT_FOR_NODES, DEFAULT_WAIT_FOR_NODES_SECONDS))
            _flower_log.info("blindtune: waiting up to %.0f s for %d SuperNodes", timeout, needed)
            node_ids = wait_for_nodes(grid, needed, timeout)
        _flower_log.info("blindtune %s: %d SuperNodes: %s", config.method, len(node_ids), node_ids)
        inner_server_app, _ = self.apps_for(context, config=config)
        inner_server_app(grid, context)
        _flower_log.info("blindtune: %s", outcome_line(out_dir))


@functools.lru_cache(maxsize=4)  # per process, which may unpickle a new DeployedApps for every message
def _built_apps(
    build: AppsBuilder, method_sections: MethodSections, config_json: str, out_dir: str, progress: bool, resume: bool
) -> tuple[ServerApp, ClientApp]:
    config = run_config_from_dict(json.loads(config_json), method_sections)
    return build(config, Path(out_dir), progress, resume)


_messages_seen = 0  # by this process's ClientApps


class _RunConfiguredClientApp(ClientApp):
    """Hands every message, whatever its type, to the ClientApp built for the message's run.

    The built app applies its own mods (e.g. secure aggregation), so nothing is registered here.
    """

    def __init__(self, apps: DeployedApps) -> None:
        super().__init__()
        self._apps = apps

    def __call__(self, message: Message, context: Context) -> Message:
        global _messages_seen
        if not _messages_seen:  # a new process per message pays this before every message
            _flower_log.info(
                "first message %.1f s after this process started", time.time() - psutil.Process().create_time()
            )
        _messages_seen += 1
        workdir = context.node_config.get(WORKDIR)
        _, inner_client_app = self._apps.apps_for(
            context, Path(str(workdir)).expanduser().resolve() if workdir else None
        )
        started = time.perf_counter()
        reply = inner_client_app(message, context)
        _flower_log.info("%s message handled in %.1f s", message.metadata.message_type, time.perf_counter() - started)
        return reply
