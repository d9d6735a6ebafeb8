"""Run a blindtune federation as a real Flower deployment: a SuperLink and one SuperNode per client.

Every party is its own operating-system process on loopback, as it would be on separate machines:

    flower-superlink  --host 127.0.0.1 --port P  (--insecure | --ssl-ca-certfile/--ssl-certfile/--ssl-keyfile)
    flower-supernode  --superlink 127.0.0.1:P --host 127.0.0.1 --port Q_i --isolation process
                      --node-config "partition-id=i num-partitions=N"
                      (--insecure | --root-certificates CA)  [--auth-supernode-private-key KEY_i]
    python -m blindtune.federation.warm_client --insecure --runtime-api-address 127.0.0.1:Q_i
    flwr run APP blindtune --run-config RUN_CONFIG.toml --format json

The SuperLink starts the ServerApp in a subprocess; each SuperNode's messages run in its one warm
ClientApp process (`warm_client.py`). The caller names the apps (`AppComponents`; blindtune's are
`blindtune.runner:server_app` / `client_app`, which rebuild the method's apps from the run config).
Flower 1.42 serves the Fleet, Control and runtime APIs of the SuperLink over HTTP(S) on one port.
With `DeploymentOptions.simulation` the SuperLink runs Flower's simulation runtime instead of
SuperNode processes (the `simulation` engine). `run_supernode` runs one organisation's SuperNode on
another host (`blindtune supernode`).

`run_deployment` runs the federation of one run config; `blindtune.runner.launch` runs a whole
experiment this way (federation, baselines, results.json, report.md). Every process
is started in its own session, its output goes to `out_dir/logs/`, and all of them (with the app
processes they spawned) are terminated when the run ends, fails or is interrupted (Ctrl-C, SIGTERM,
interpreter exit), and sent SIGTERM by the kernel if the launcher itself is killed.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import dataclasses
import json
import logging
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import IO, Any

import tomli_w

from blindtune.config import RunConfig
from blindtune.federation.apps import FEDERATION_RESULT
from blindtune.federation.engine import DATA, NUM_PARTITIONS, PARTITION_ID
from blindtune.federation.flower_app import WORKDIR, run_config_entries

log = logging.getLogger(__name__)

CONNECTION = "blindtune"  # the SuperLink connection name in the launcher's private Flower config
LOGS = "logs"
FLWR_HOME_DIR = ".flwr-home"
HOST = "127.0.0.1"
CODE_ROOT = Path(__file__).resolve().parents[2]  # the directory that holds this blindtune package


class DeploymentError(RuntimeError):
    """A process of the deployment failed, or the run did not finish; the message has the log tail."""


@dataclass(frozen=True)
class TlsFiles:
    """PEM files for the SuperLink's TLS.

    ca_cert: the CA certificate SuperNodes and the `flwr` CLI trust (`--root-certificates`);
    server_cert / server_key: the SuperLink's certificate, valid for 127.0.0.1 (an IP SAN), and key.
    """

    ca_cert: Path
    server_cert: Path
    server_key: Path

    def resolved(self) -> TlsFiles:
        files = TlsFiles(*(Path(p).expanduser().resolve() for p in (self.ca_cert, self.server_cert, self.server_key)))
        for path in (files.ca_cert, files.server_cert, files.server_key):
            if not path.is_file():
                raise FileNotFoundError(f"TLS file not found: {path}")
        _check_pem(files.ca_cert, "certificate")
        _check_pem(files.server_cert, "certificate")
        _check_pem(files.server_key, "private key")
        return files


def _check_pem(path: Path, kind: str) -> None:
    """Refuse a file that is not a PEM `kind` before any process is started with it."""
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    data = path.read_bytes()
    try:
        if kind == "certificate":
            x509.load_pem_x509_certificate(data)
        else:
            load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as error:
        raise DeploymentError(f"{path} is not a PEM {kind} ({error})") from None


@dataclass(frozen=True)
class SimulatedNodes:
    """The SuperLink's own simulation runtime instead of SuperNode processes: virtual SuperNodes
    (Ray actors) with these resources each (`flwr run --federation-config`)."""

    cpus: float = 1.0
    gpus: float = 0.0
    total_cpus: int | None = None  # the CPUs Ray schedules clients on (None: the machine's cores)


@dataclass
class DeploymentOptions:
    """How the processes are started.

    tls: TLS certificates for the SuperLink (None: `--insecure`, plain HTTP on loopback).
    node_auth: SuperNode authentication (needs `tls`): the launcher makes one EC key pair per node,
        registers the public keys with `flwr supernode register` and starts the SuperLink with
        `--enable-supernode-auth`; a node without a registered key is refused.
    startup_timeout_seconds: for the SuperLink to answer and all SuperNodes to come online.
    run_timeout_seconds: for the run, from submission (None: no limit).
    grace_seconds: between SIGTERM and SIGKILL at shutdown.
    threads_per_client: torch/OpenMP threads of each SuperNode's processes (None: cores / clients,
        so co-located clients do not oversubscribe the machine; an OMP_NUM_THREADS already set wins).
    app_progress: progress bars in the app processes' logs.
    warm_clients: each SuperNode runs its messages in one long-lived process (`warm_client.py`, with
        `--isolation process`) instead of a new `flwr-clientapp` process per message.
    simulation: run the clients as virtual SuperNodes of a `flower-superlink --simulation` (Flower's
        simulation runtime) instead of starting SuperNode processes.
    """

    tls: TlsFiles | None = None
    node_auth: bool = False
    startup_timeout_seconds: float = 120.0
    run_timeout_seconds: float | None = None
    grace_seconds: float = 10.0
    threads_per_client: int | None = None
    app_progress: bool = False
    warm_clients: bool = True
    simulation: SimulatedNodes | None = None


@dataclass(frozen=True)
class AppComponents:
    """The Flower App the processes run: `module:attribute` of its ServerApp and of its ClientApp."""

    serverapp: str
    clientapp: str


def run_deployment(
    config: RunConfig,
    out_dir: Path,
    app: AppComponents,
    options: DeploymentOptions | None = None,
    resume: bool = False,
) -> dict[str, Any]:
    """Run the federation of `config` with the Flower App `app` on a loopback deployment; return
    `out_dir/federation.json`.

    One SuperNode per `config.federation.num_clients`. Raises DeploymentError when a process dies or
    the run ends without a federation result; a failed method run returns its `status: failed` result.
    """
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    with _signals_raise(), Deployment(out_dir, config.federation.num_clients, options) as deployment:
        return deployment.run(config, app, resume)


@dataclass
class _Process:
    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path
    log_file: IO[bytes]
    command: list[str]
    env: dict[str, str]
    restarts_left: int = 0

    def tail(self, lines: int = 40) -> str:
        return log_tail(self.log_path, lines)


def log_tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


class Deployment:
    """A SuperLink and `num_clients` SuperNodes on loopback; a context manager that always cleans up."""

    def __init__(self, out_dir: Path, num_clients: int, options: DeploymentOptions | None = None) -> None:
        self.out_dir = Path(out_dir).resolve()
        self.num_clients = num_clients
        self.options = options or DeploymentOptions()
        if self.options.tls is not None:
            self.options = dataclasses.replace(self.options, tls=self.options.tls.resolved())
        if self.options.node_auth and self.options.tls is None:
            raise DeploymentError("SuperNode authentication needs TLS (Flower refuses it on an insecure SuperLink)")
        if self.options.node_auth and self.options.simulation is not None:
            raise DeploymentError("SuperNode authentication does not apply to simulated SuperNodes")
        self.log_dir = self.out_dir / LOGS
        self.processes: list[_Process] = []
        self.superlink_port = 0
        self.supernode_ports: list[int] = []
        self._home: Path | None = None
        self._stopped = False
        # Every descendant seen while the processes ran: a killed SuperLink's SuperExec and ServerApp
        # (the SuperExec leads a session of its own) are no longer anyone's descendants when we stop.
        self._seen: dict[int, Any] = {}

    # lifecycle -------------------------------------------------------------------------------------

    def __enter__(self) -> Deployment:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def start(self) -> None:
        """Start the SuperLink, register node keys, start the SuperNodes; wait until all are online."""
        _LIVE.add(self)
        try:
            self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        # Flower's home for this deployment only (CLI connection, installed FABs); removed at stop.
        self._home = self.out_dir / FLWR_HOME_DIR
        shutil.rmtree(self._home, ignore_errors=True)  # left over by a launcher that was killed
        self._home.mkdir(parents=True)
        ports = free_ports(1 + self.num_clients)
        self.superlink_port, self.supernode_ports = ports[0], ports[1:]
        self._write_flower_config()
        started = time.monotonic()
        superlink = self._spawn("superlink", self.superlink_command(), self._env())
        self._wait_until(self._superlink_ready, [superlink], "the SuperLink to answer")
        if self.options.simulation is not None:  # its virtual SuperNodes come with each run
            log.info(
                "simulation SuperLink up in %.1f s on %s:%d", time.monotonic() - started, HOST, self.superlink_port
            )
            return
        keys = self._make_node_keys() if self.options.node_auth else [None] * self.num_clients
        for key in keys:
            if key is not None:
                self._flwr(["supernode", "register", str(key.with_suffix(".pub")), CONNECTION], "register a node key")
        threads = self.options.threads_per_client or max(1, (os.cpu_count() or 1) // self.num_clients)
        supernodes = []
        for i, key in enumerate(keys):
            supernodes.append(self._spawn(f"supernode-{i}", self.supernode_command(i, key), self._env(threads)))
            if self.options.warm_clients:
                clientapp = self._spawn(f"clientapp-{i}", self.warm_client_command(i), self._env(threads), 3)
                supernodes.append(clientapp)
        self._wait_until(self._all_nodes_online, [superlink, *supernodes], f"{self.num_clients} SuperNodes to connect")
        log.info(
            "deployment up in %.1f s: SuperLink %s:%d, %d SuperNodes",
            time.monotonic() - started,
            HOST,
            self.superlink_port,
            self.num_clients,
        )

    def stop(self) -> None:
        """Terminate every process (and the app processes they spawned): SIGTERM, then SIGKILL."""
        if self._stopped:
            return
        self._stopped = True
        _LIVE.discard(self)
        trees = [(process, _tree(process.popen.pid)) for process in reversed(self.processes)]
        in_trees = {child.pid for _, children in trees for child in children}
        orphans = [child for pid, child in self._seen.items() if pid not in in_trees and _alive(child)]
        for process, children in trees:
            _signal_tree(process.popen, children, signal.SIGTERM)
        for orphan in orphans:
            with contextlib.suppress(Exception):
                orphan.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.options.grace_seconds
        _wait_gone(orphans, deadline)
        for orphan in orphans:
            if _alive(orphan):
                log.warning("pid %d did not stop within %.0f s: killing it", orphan.pid, self.options.grace_seconds)
                with contextlib.suppress(Exception):
                    orphan.kill()
        for process, children in trees:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.popen.wait(timeout=max(0.1, deadline - time.monotonic()))
            _wait_gone(children, deadline)
            if process.popen.poll() is None or any(_alive(child) for child in children):
                log.warning("%s did not stop within %.0f s: killing it", process.name, self.options.grace_seconds)
                _signal_tree(process.popen, children, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    process.popen.wait(timeout=5)
            process.log_file.close()
        if self._home is not None:
            shutil.rmtree(self._home, ignore_errors=True)

    # the run ---------------------------------------------------------------------------------------

    def run(self, config: RunConfig, app: AppComponents, resume: bool = False) -> dict[str, Any]:
        """Submit `config` with `flwr run`, wait until the run finishes, return federation.json."""
        if config.federation.num_clients != self.num_clients:
            raise DeploymentError(f"the run needs {config.federation.num_clients} clients, {self.num_clients} are up")
        result_file = self.out_dir / FEDERATION_RESULT
        result_file.unlink(missing_ok=True)
        run_id = self.submit(config, app, resume)
        status = self.wait(run_id, result_file)
        server_log = self.log_dir / "serverapp.log"
        self.save_server_log(run_id, server_log)
        if not result_file.is_file():
            raise DeploymentError(
                f"run {run_id} ended ({status}) without writing {result_file}; "
                f"ServerApp log ({server_log}):\n{log_tail(server_log)}"
            )
        return dict(json.loads(result_file.read_text()))

    def submit(self, config: RunConfig, app: AppComponents, resume: bool = False) -> int:
        assert self._home is not None
        app_dir = self._home / "app"
        app_dir.mkdir(exist_ok=True)
        (app_dir / "pyproject.toml").write_text(app_pyproject(app))
        entries = run_config_entries(
            config, self.out_dir, self.options.app_progress, self.options.startup_timeout_seconds, resume
        )
        run_config = self._home / "run_config.toml"
        run_config.write_text(tomli_w.dumps(entries))
        command = ["run", str(app_dir), CONNECTION, "--run-config", str(run_config), "--format", "json"]
        if (simulation := self.options.simulation) is not None:
            federation = {
                "num-supernodes": self.num_clients,
                "client-resources-num-cpus": simulation.cpus,
                "client-resources-num-gpus": simulation.gpus,
                **({"init-args-num-cpus": simulation.total_cpus} if simulation.total_cpus else {}),
                "init-args-logging-level": "WARNING",
                "verbose": log.isEnabledFor(logging.DEBUG),
            }
            command += ["--federation-config", " ".join(f"{k}={json.dumps(v)}" for k, v in federation.items())]
        output = self._flwr(command, "submit the run")
        reply = _json_in(output)
        if not reply.get("success") or reply.get("run-id") is None:
            raise DeploymentError(f"`flwr run` did not start the run: {output.strip()}")
        run_id = int(reply["run-id"])
        log.info("run %d submitted (FAB %s)", run_id, reply.get("fab-hash"))
        return run_id

    def wait(self, run_id: int, result_file: Path) -> str:
        """Poll until the run is finished; raise DeploymentError if a process dies or time runs out."""
        started = time.monotonic()
        timeout = self.options.run_timeout_seconds
        next_status = 0.0
        result_seen = False
        failed_queries = 0
        while True:
            self._check_alive(self.processes)
            now = time.monotonic()
            if not result_seen and result_file.exists():
                result_seen, next_status = True, now  # the server is done: ask at once
            if now >= next_status:
                try:
                    status = self.run_status(run_id)
                    failed_queries = 0
                except DeploymentError:  # a busy SuperLink may miss one query; a dead one is caught above
                    failed_queries += 1
                    if failed_queries >= 3:
                        raise
                    status = "unknown"
                if status.startswith("finished"):
                    log.info("run %d %s after %.1f s", run_id, status, now - started)
                    return status
                # The CLI costs a second of CPU: ask rarely until the server has written its result.
                next_status = now + (1.0 if result_seen else 15.0)
            if timeout is not None and now - started > timeout:
                with contextlib.suppress(DeploymentError):
                    self._flwr(["stop", str(run_id), CONNECTION], "stop the run")
                raise DeploymentError(f"run {run_id} did not finish within {timeout:.0f} s")
            time.sleep(0.5)

    def run_status(self, run_id: int) -> str:
        reply = _json_in(self._flwr(["ls", CONNECTION, "--run-id", str(run_id), "--format", "json"], "query the run"))
        runs = reply.get("runs") or []
        return str(runs[0].get("status", "unknown")) if runs else "unknown"

    def save_server_log(self, run_id: int, path: Path) -> None:
        """The ServerApp's output, which the SuperLink keeps per run (`flwr log RUN_ID --show`)."""
        try:
            path.write_text(self._flwr(["log", str(run_id), CONNECTION, "--show"], "fetch the ServerApp log", 60))
        except DeploymentError as error:
            path.write_text(f"could not fetch the ServerApp log: {error}\n")

    # commands --------------------------------------------------------------------------------------

    def superlink_command(self) -> list[str]:
        command = [flower_command("flower-superlink"), "--host", HOST, "--port", str(self.superlink_port)]
        # The app's dependencies are this environment's; never `uv sync` them from the network.
        command.append("--disable-runtime-dependency-installation")
        tls = self.options.tls
        if tls is None:
            command.append("--insecure")
        else:
            command += ["--ssl-ca-certfile", str(tls.ca_cert), "--ssl-certfile", str(tls.server_cert)]
            command += ["--ssl-keyfile", str(tls.server_key)]
        if self.options.node_auth:
            command.append("--enable-supernode-auth")
        if self.options.simulation is not None:
            command.append("--simulation")
        return command

    def node_settings(self, partition_id: int, private_key: Path | None = None) -> SuperNodeSettings:
        tls = self.options.tls
        return SuperNodeSettings(
            superlink=f"{HOST}:{self.superlink_port}",
            partition_id=partition_id,
            num_partitions=self.num_clients,
            root_certificates=None if tls is None else tls.ca_cert,
            auth_key=private_key,
            runtime_address=f"{HOST}:{self.supernode_ports[partition_id]}",
            warm=self.options.warm_clients,
        )

    def supernode_command(self, partition_id: int, private_key: Path | None = None) -> list[str]:
        return supernode_command(self.node_settings(partition_id, private_key))

    def warm_client_command(self, partition_id: int) -> list[str]:
        return warm_client_command(self.node_settings(partition_id))

    def _env(self, threads: int | None = None) -> dict[str, str]:
        assert self._home is not None
        env = dict(os.environ)
        env.update(
            FLWR_HOME=str(self._home),
            FLWR_TELEMETRY_ENABLED="0",
            FLWR_DISABLE_UPDATE_CHECK="1",
            PYTHONUNBUFFERED="1",
            # Flower starts `flower-superexec`, `flwr-serverapp` and `flwr-clientapp` by name.
            PATH=os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")]),
            # The processes run the launcher's blindtune, also from a source checkout.
            PYTHONPATH=os.pathsep.join(filter(None, [str(CODE_ROOT), env.get("PYTHONPATH", "")])),
        )
        if threads is not None:
            for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
                env.setdefault(name, str(threads))
        return env

    def _write_flower_config(self) -> None:
        """The `flwr` CLI's connection to this SuperLink, in a private FLWR_HOME."""
        assert self._home is not None
        connection: dict[str, Any] = {"address": f"{HOST}:{self.superlink_port}"}
        if self.options.tls is None:
            connection["insecure"] = True
        else:
            connection["root-certificates"] = str(self.options.tls.ca_cert)
        config = {"superlink": {"default": CONNECTION, CONNECTION: connection}}
        (self._home / "config.toml").write_text(tomli_w.dumps(config))

    def _make_node_keys(self) -> list[Path | None]:
        assert self._home is not None
        keys: list[Path | None] = []
        for i in range(self.num_clients):
            path = self._home / "keys" / f"supernode-{i}"
            write_node_key_pair(path)
            keys.append(path)
        return keys

    def _spawn(self, name: str, command: list[str], env: dict[str, str], restarts: int = 0) -> _Process:
        """Start `command`; if it ends before the deployment does, start it again up to `restarts` times."""
        log_path = self.log_dir / f"{name}.log"
        log_file = log_path.open("wb")
        process = _Process(name, self._popen(command, env, log_file), log_path, log_file, command, env, restarts)
        self.processes.append(process)
        log.info("started %s (pid %d): %s", name, process.popen.pid, " ".join(command))
        return process

    def _popen(self, command: list[str], env: dict[str, str], log_file: IO[bytes]) -> subprocess.Popen[bytes]:
        log_file.write(f"$ {' '.join(command)}\n".encode())
        log_file.flush()
        return subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            cwd=self.out_dir,
            env=env,
            start_new_session=True,  # its own process group: a terminal's Ctrl-C reaches only the launcher
            preexec_fn=_die_with_parent(),
        )

    def _flwr(self, args: list[str], what: str, timeout: float = 120.0) -> str:
        command = [flower_command("flwr"), *args]
        try:
            done = subprocess.run(
                command,
                capture_output=True,
                text=True,
                env=self._env(),
                cwd=self.out_dir,
                timeout=timeout,
                stdin=subprocess.DEVNULL,
            )
        except subprocess.TimeoutExpired as error:
            raise DeploymentError(f"`flwr {' '.join(args)}` ({what}) timed out after {timeout:.0f} s") from error
        if done.returncode != 0:
            raise DeploymentError(
                f"could not {what}: `flwr {' '.join(args)}` exited with {done.returncode}:\n"
                f"{(done.stdout + done.stderr).strip()[-3000:]}"
            )
        return done.stdout

    # readiness and liveness ------------------------------------------------------------------------

    def _superlink_ready(self) -> bool:
        tls = self.options.tls
        scheme = "http" if tls is None else "https"
        context = None if tls is None else ssl.create_default_context(cafile=str(tls.ca_cert))
        try:
            with urllib.request.urlopen(f"{scheme}://{HOST}:{self.superlink_port}/health", timeout=2, context=context):
                return True
        except (urllib.error.URLError, OSError):
            return False

    def _all_nodes_online(self) -> bool:
        reply = _json_in(self._flwr(["supernode", "ls", CONNECTION, "--format", "json"], "list the SuperNodes"))
        online = [node for node in reply.get("nodes", []) if node.get("status") == "online"]
        return len(online) >= self.num_clients

    def _wait_until(self, ready: Callable[[], bool], watched: list[_Process], what: str) -> None:
        deadline = time.monotonic() + self.options.startup_timeout_seconds
        while True:
            self._check_alive(watched)
            if ready():
                return
            if time.monotonic() > deadline:
                tails = "\n".join(f"--- {p.name} ({p.log_path}):\n{p.tail(15)}" for p in watched)
                raise DeploymentError(
                    f"timed out after {self.options.startup_timeout_seconds:.0f} s waiting for {what}\n{tails}"
                )
            time.sleep(0.5)

    def _check_alive(self, processes: list[_Process]) -> None:
        for process in self.processes:
            self._seen.update((child.pid, child) for child in _descendants(process.popen.pid))
        for process in processes:
            code = process.popen.poll()
            if code is not None and process.restarts_left > 0:
                # A warm ClientApp process that died (killed, out of memory): its SuperNode keeps the node
                # in the federation, and a new process rebuilds the client from its work directory.
                process.restarts_left -= 1
                log.warning("%s exited with code %s: starting it again", process.name, code)
                process.popen = self._popen(process.command, process.env, process.log_file)
            elif code is not None:
                raise DeploymentError(
                    f"{process.name} exited with code {code}; last lines of {process.log_path}:\n{process.tail()}"
                )


# one SuperNode, as its organisation runs it -------------------------------------------------------


@dataclass(frozen=True)
class SuperNodeSettings:
    """One client organisation's SuperNode (`blindtune supernode`, and each node `Deployment` starts).

    superlink: HOST:PORT of the SuperLink. partition_id / num_partitions: which client this is, of how
    many (`--node-config`). data: the organisation's own files, in the run's task format (None: its
    slice of the task the run config names, as in a simulation). workdir: its own storage (None: the
    run's out-dir). root_certificates: the CA the SuperLink's certificate is signed by (None:
    `--insecure`). auth_key: its private key for SuperNode authentication. runtime_address: where the
    SuperNode serves its ClientApp process (loopback). warm: one long-lived ClientApp process.
    """

    superlink: str
    partition_id: int
    num_partitions: int
    data: Path | None = None
    workdir: Path | None = None
    root_certificates: Path | None = None
    auth_key: Path | None = None
    runtime_address: str = f"{HOST}:9094"
    warm: bool = True

    def node_config(self) -> str:
        entries: dict[str, object] = {PARTITION_ID: self.partition_id, NUM_PARTITIONS: self.num_partitions}
        if self.data is not None:
            entries[DATA] = str(self.data)
        if self.workdir is not None:
            entries[WORKDIR] = str(self.workdir)
        return " ".join(f"{key}={json.dumps(value)}" for key, value in entries.items())


def supernode_command(node: SuperNodeSettings) -> list[str]:
    """`flower-supernode` for `node`."""
    host, port = node.runtime_address.rsplit(":", 1)
    command = [flower_command("flower-supernode"), "--superlink", node.superlink]
    command += (
        ["--insecure"] if node.root_certificates is None else ["--root-certificates", str(node.root_certificates)]
    )
    command += ["--host", host, "--port", port, "--node-config", node.node_config()]
    if node.auth_key is not None:
        command += ["--auth-supernode-private-key", str(node.auth_key)]
    if node.warm:
        command += ["--isolation", "process"]  # the node's ClientApp process is `warm_client_command`
    return command


def warm_client_command(node: SuperNodeSettings) -> list[str]:
    """The long-lived ClientApp process of `node` (on its loopback runtime API, plain HTTP)."""
    return [
        sys.executable,
        "-m",
        "blindtune.federation.warm_client",
        "--insecure",
        "--runtime-api-address",
        node.runtime_address,
    ]


def run_supernode(node: SuperNodeSettings, grace_seconds: float = 10.0) -> int:
    """Run `node`'s SuperNode (and its warm ClientApp process) in the foreground until one of them
    ends, Ctrl-C or SIGTERM; then stop the other. Returns the SuperNode's exit code (130: interrupted)."""
    commands = [supernode_command(node)] + ([warm_client_command(node)] if node.warm else [])
    env = dict(os.environ)
    env.update(FLWR_TELEMETRY_ENABLED="0", PYTHONUNBUFFERED="1")
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(CODE_ROOT), env.get("PYTHONPATH", "")]))
    processes: list[subprocess.Popen[bytes]] = []
    try:
        with _signals_raise():
            for command in commands:
                log.info("starting: %s", " ".join(command))
                processes.append(
                    subprocess.Popen(
                        command,
                        stdin=subprocess.DEVNULL,
                        env=env,
                        start_new_session=True,
                        preexec_fn=_die_with_parent(),
                    )
                )
            while all(process.poll() is None for process in processes):
                time.sleep(0.5)
            return int(processes[0].wait())
    except KeyboardInterrupt:
        return 130
    finally:
        trees = [(process, _tree(process.pid)) for process in processes]
        for process, children in trees:
            _signal_tree(process, children, signal.SIGTERM)
        deadline = time.monotonic() + grace_seconds
        for process, children in trees:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            _wait_gone(children, deadline)
            if process.poll() is None or any(_alive(child) for child in children):
                _signal_tree(process, children, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    process.wait(timeout=5)


def app_pyproject(app: AppComponents) -> str:
    """pyproject.toml of the Flower App `flwr run` bundles: metadata only, the code is installed blindtune."""
    try:
        version = metadata.version("blindtune")
    except metadata.PackageNotFoundError:
        version = "0.0.0"
    document = {
        "project": {
            "name": "blindtune",
            "version": version,
            "description": "blindtune methods as a Flower App",
            "license": "Apache-2.0",
        },
        "tool": {
            "flwr": {
                "app": {
                    "publisher": "blindtune",
                    "components": {"serverapp": app.serverapp, "clientapp": app.clientapp},
                    "config": {
                        "blindtune-config": "",
                        "config-file": "",
                        "out-dir": "",
                        "progress": False,
                        "resume": False,
                        "wait-for-nodes-seconds": 300.0,
                        "clients-from-federation": False,
                    },
                }
            }
        },
    }
    return tomli_w.dumps(document)


def write_node_key_pair(path: Path) -> Path:
    """An EC (P-384) key pair for SuperNode authentication, in OpenSSH format: `path` and `path.pub`."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP384R1())
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption())
    )
    path.chmod(0o600)
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    path.with_suffix(".pub").write_bytes(public + b"\n")
    return path


def flower_command(name: str) -> str:
    """Path of a Flower console script: next to this interpreter first, then on PATH."""
    candidate = Path(sys.executable).parent / name
    if candidate.is_file():
        return str(candidate)
    found = shutil.which(name)
    if found is None:
        raise DeploymentError(f"`{name}` not found: is flwr installed in this environment?")
    return found


def free_ports(count: int) -> list[int]:
    """`count` distinct free TCP ports on 127.0.0.1 (held open together, so they differ)."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) for _ in range(count)]
        for sock in sockets:
            sock.bind((HOST, 0))
        return [sock.getsockname()[1] for sock in sockets]


def _json_in(output: str) -> dict[str, Any]:
    """The JSON object `flwr ... --format json` printed (after any other lines)."""
    start = output.find("{")
    if start < 0:
        raise DeploymentError(f"expected JSON from flwr, got: {output.strip()[-2000:]}")
    try:
        return dict(json.loads(output[start:]))
    except json.JSONDecodeError as error:
        raise DeploymentError(f"unreadable JSON from flwr ({error}): {output.strip()[-2000:]}") from error


# process-tree handling ---------------------------------------------------------------------------

_LIVE: set[Deployment] = set()


@atexit.register
def _stop_all() -> None:
    for deployment in list(_LIVE):
        deployment.stop()


@contextlib.contextmanager
def _signals_raise() -> Iterator[None]:
    """Turn SIGTERM/SIGHUP into an exception while a deployment runs, so its cleanup runs (Ctrl-C already does)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"received {signal.Signals(signum).name}")

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _die_with_parent() -> Callable[[], None] | None:
    """On Linux, have the kernel send SIGTERM to a child when the launcher dies (even by SIGKILL)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL("libc.so.6", use_errno=True).prctl
    except OSError:
        return None
    pr_set_pdeathsig = 1
    term = int(signal.SIGTERM)

    def set_death_signal() -> None:
        prctl(pr_set_pdeathsig, term, 0, 0, 0)

    return set_death_signal


def _descendants(pid: int) -> list[Any]:
    import psutil

    try:
        return list(psutil.Process(pid).children(recursive=True))
    except psutil.Error:  # the process is gone: its process group still gets signalled
        return []


def _tree(pid: int) -> list[Any]:
    """The descendants of `pid`, and every other member of the process group it leads (orphans of a
    killed member stay in the group but are no longer its descendants)."""
    import psutil

    members = {child.pid: child for child in _descendants(pid)}
    for process in psutil.process_iter():
        with contextlib.suppress(psutil.Error, OSError):
            if process.pid != pid and os.getpgid(process.pid) == pid:
                members.setdefault(process.pid, process)
    return list(members.values())


def _alive(process: Any) -> bool:
    try:
        return bool(process.is_running()) and process.status() != "zombie"
    except Exception:
        return False


def _wait_gone(processes: list[Any], deadline: float) -> None:
    while any(_alive(p) for p in processes) and time.monotonic() < deadline:
        time.sleep(0.1)


def _signal_tree(popen: subprocess.Popen[bytes], children: list[Any], sig: signal.Signals) -> None:
    """Signal the process's group (it leads its own session) and every descendant, wherever it went."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(popen.pid, sig)
    for child in children:
        with contextlib.suppress(Exception):
            if child.is_running():
                child.send_signal(sig)
