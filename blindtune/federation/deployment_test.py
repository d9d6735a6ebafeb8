"""The deployment engine: real SuperLink/SuperNode processes on loopback, with and without TLS."""

from __future__ import annotations

import contextlib
import datetime
import io
import ipaddress
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import tomllib
import zipfile
from pathlib import Path

import pytest

from blindtune.federation import flower_app
from blindtune.federation.deployment import (
    Deployment,
    DeploymentError,
    DeploymentOptions,
    TlsFiles,
    app_pyproject,
    free_ports,
)
from blindtune.methods import config_class, run_config_from_dict
from blindtune.models import tiny_model
from blindtune.runner import FLOWER_APP, launch

REPO_PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny-model")
    loaded = tiny_model(num_layers=8, hidden_size=32)
    loaded.model.save_pretrained(directory)
    loaded.tokenizer.save_pretrained(directory)
    return directory


def tiny_config(model_dir, num_clients: int = 2, rounds: int = 2):
    return run_config_from_dict(
        {
            "method": "offsite",
            "model": str(model_dir),
            "task": "wordnet-supersense",
            "federation": {"num_clients": num_clients, "rounds": rounds, "engine": "inprocess"},
            "train": {"steps": 2, "batch_size": 4, "max_length": 64},
            "eval": {"limit": 12, "batch_size": 6, "every_round": False},
            "baselines": {"centralized": False, "local_only": False},
        }
    )


def make_tls_files(directory: Path, address: str = "127.0.0.1") -> TlsFiles:
    """A throw-away CA and a SuperLink certificate for `address`/localhost signed by it."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)
    directory.mkdir(parents=True, exist_ok=True)

    def name(common_name: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(name("blindtune test CA"))
        .issuer_name(name("blindtune test CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    server_key = ec.generate_private_key(ec.SECP256R1())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(name(address))
        .issuer_name(ca_cert.subject)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(address)), x509.DNSName("localhost")]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    files = TlsFiles(directory / "ca.pem", directory / "server.pem", directory / "server.key")
    files.ca_cert.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    files.server_cert.write_bytes(server_cert.public_bytes(serialization.Encoding.PEM))
    files.server_key.write_bytes(
        server_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return files


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie still answers kill(0); it holds no resources and waits for its (init) parent
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def assert_all_gone(pids, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(pid_alive(pid) for pid in pids):
        time.sleep(0.2)
    assert not [pid for pid in pids if pid_alive(pid)], "orphaned processes"


# fast checks ---------------------------------------------------------------------------------------


def test_run_config_round_trips_through_the_flower_run_config(tiny_model_dir, tmp_path):
    config = tiny_config(tiny_model_dir)
    entries = flower_app.run_config_entries(config, tmp_path, wait_for_nodes_seconds=30)
    assert flower_app.config_from_run_config(entries, config_class).to_json() == config.to_json()
    assert entries[flower_app.OUT_DIR] == str(tmp_path.resolve())


def test_packaged_config_name_is_found():
    config = flower_app.config_from_run_config(
        {flower_app.CONFIG_FILE: "offsite_wordnet_3clients_quick.yaml"}, config_class
    )
    assert config.method == "offsite"


def test_flower_app_metadata_is_valid_for_flwr_run():
    from flwr.common.config import validate_config

    for document in (tomllib.loads(app_pyproject(FLOWER_APP)), tomllib.loads(REPO_PYPROJECT.read_text())):
        valid, errors, _ = validate_config(document, check_module=True)
        assert valid, errors
        app = document["tool"]["flwr"]["app"]
        assert app["components"] == {
            "serverapp": "blindtune.runner:server_app",
            "clientapp": "blindtune.runner:client_app",
        }
        assert set(app["config"]) >= {"blindtune-config", "config-file", "out-dir"}


def test_repo_fab_carries_no_code_that_could_shadow_the_installed_package():
    from flwr.cli.build import build_fab_from_disk

    fab = build_fab_from_disk(REPO_PYPROJECT.parent)
    names = zipfile.ZipFile(io.BytesIO(fab)).namelist()
    assert "pyproject.toml" in names and not [n for n in names if n.startswith("blindtune/")], names


def test_process_commands_use_flowers_flags(tmp_path):
    tls = TlsFiles(tmp_path / "ca.pem", tmp_path / "cert.pem", tmp_path / "key.pem")
    deployment = Deployment(tmp_path, 2)
    deployment.superlink_port, deployment.supernode_ports = 9000, [9001, 9002]
    assert "--insecure" in deployment.superlink_command()
    node = deployment.supernode_command(1)
    assert node[node.index("--superlink") + 1] == "127.0.0.1:9000"
    assert node[node.index("--node-config") + 1] == "partition-id=1 num-partitions=2"
    assert node[node.index("--port") + 1] == "9002" and "--insecure" in node
    deployment.options = DeploymentOptions(tls=tls, node_auth=True)
    link = deployment.superlink_command()
    assert "--insecure" not in link and "--enable-supernode-auth" in link
    assert link[link.index("--ssl-certfile") + 1] == str(tls.server_cert)
    node = deployment.supernode_command(0, tmp_path / "key")
    assert node[node.index("--root-certificates") + 1] == str(tls.ca_cert)
    assert node[node.index("--auth-supernode-private-key") + 1] == str(tmp_path / "key")


def test_node_auth_requires_tls(tmp_path):
    with pytest.raises(DeploymentError, match="TLS"):
        Deployment(tmp_path, 2, DeploymentOptions(node_auth=True))


def test_missing_tls_file_is_reported(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"ca\.pem"):
        Deployment(tmp_path, 2, DeploymentOptions(tls=TlsFiles(tmp_path / "ca.pem", tmp_path / "c", tmp_path / "k")))


def test_launch_command_wants_all_three_tls_files(tmp_path):
    from typer.testing import CliRunner

    from blindtune.cli import app, packaged_config

    config = packaged_config("offsite_wordnet_3clients_quick.yaml")
    result = CliRunner().invoke(app, ["launch", str(config), "--out", str(tmp_path), "--tls-ca-cert", str(config)])
    assert result.exit_code == 2 and "--tls-server-key" in result.output
    assert not (tmp_path / "logs").exists()


def test_free_ports_are_distinct():
    ports = free_ports(5)
    assert len(set(ports)) == 5 and all(p > 0 for p in ports)


# real processes ------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.ci
def test_two_client_deployment_end_to_end(tiny_model_dir, tmp_path):
    started = time.monotonic()
    results = launch(tiny_config(tiny_model_dir), tmp_path, num_clients=2, progress=False)
    print(f"insecure 2-client deployment: {time.monotonic() - started:.1f} s")
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["num_clients"] == 2
    assert [row["round"] for row in results["history"]] == [1, 2]
    assert results["failures"] == [] and results["cost"]["bytes_to_server"] > 0
    for key in ("llm_zero_shot", "emulator_zero_shot", "plugin"):
        assert results["metrics"][key] * 12 == pytest.approx(round(results["metrics"][key] * 12)), key
    assert (tmp_path / "report.md").is_file()
    assert (tmp_path / "checkpoints" / "round-0002" / "adapter.safetensors").is_file()
    logs = tmp_path / "logs"
    assert {p.name for p in logs.iterdir()} >= {"superlink.log", "supernode-0.log", "supernode-1.log", "serverapp.log"}
    # Each SuperNode ran its own ClientApp on its own partition: all its messages (setup, 2 rounds) in one
    # long-lived process, which started once.
    assert (tmp_path / "clients" / "client-0").is_dir() and (tmp_path / "clients" / "client-1").is_dir()
    for node in (0, 1):
        clientapp_log = (logs / f"clientapp-{node}.log").read_text()
        assert clientapp_log.count("message handled") == 3 and clientapp_log.count("first message") == 1
    assert "flwr-clientapp" not in (logs / "supernode-0.log").read_text()


@pytest.mark.slow
def test_tls_deployment_end_to_end(tiny_model_dir, tmp_path):
    tls = make_tls_files(tmp_path / "certs")
    started = time.monotonic()
    config = tiny_config(tiny_model_dir, rounds=1)  # one round proves the encrypted path; two cost a minute more
    results = launch(config, tmp_path / "run", num_clients=2, tls=tls, progress=False)
    print(f"TLS 2-client deployment: {time.monotonic() - started:.1f} s")
    assert [row["round"] for row in results["history"]] == [1] and results["failures"] == []
    superlink_log = (tmp_path / "run" / "logs" / "superlink.log").read_text()
    assert "--ssl-certfile" in superlink_log and "--insecure" not in superlink_log.splitlines()[0]
    assert "running on https://127.0.0.1" in superlink_log


@pytest.mark.slow
def test_node_auth_admits_registered_nodes_only(tmp_path):
    """With --enable-supernode-auth, registered keys come online; a node with an unknown key does not."""
    from blindtune.federation.deployment import write_node_key_pair

    tls = make_tls_files(tmp_path / "certs")
    options = DeploymentOptions(tls=tls, node_auth=True, startup_timeout_seconds=90)
    with Deployment(tmp_path / "run", 2, options) as deployment:
        assert deployment._all_nodes_online()
        stranger_key = write_node_key_pair(tmp_path / "stranger")
        command = deployment.supernode_command(0, stranger_key)
        command[command.index("--port") + 1] = str(free_ports(1)[0])
        stranger = deployment._spawn("stranger", [*command, "--max-retries", "1"], deployment._env())
        stranger.popen.wait(timeout=90)
        assert "Failed to activate SuperNode" in stranger.tail()
        reply = deployment._flwr(["supernode", "ls", "blindtune", "--format", "json"], "list nodes")
        online = [n for n in json.loads(reply[reply.index("{") :])["nodes"] if n["status"] == "online"]
        assert len(online) == 2


@pytest.mark.slow
def test_interrupted_launcher_leaves_no_processes(tmp_path):
    """Ctrl-C (SIGINT), SIGTERM or SIGKILL of the launcher end the SuperLink, SuperNodes and their children."""
    script = textwrap.dedent(
        f"""
        import json, sys, time
        from pathlib import Path
        from blindtune.federation.deployment import Deployment, _descendants, _signals_raise
        with _signals_raise(), Deployment(Path({str(tmp_path)!r}) / sys.argv[1], 2) as deployment:
            pids = [p.popen.pid for p in deployment.processes]
            pids += [c.pid for p in deployment.processes for c in _descendants(p.popen.pid)]
            print(json.dumps(pids), flush=True)
            time.sleep(600)
        """
    )
    for name, sig in (("sigint", signal.SIGINT), ("sigterm", signal.SIGTERM), ("sigkill", signal.SIGKILL)):
        launcher = subprocess.Popen([sys.executable, "-c", script, name], stdout=subprocess.PIPE, text=True)
        try:
            line = launcher.stdout.readline()
            pids = json.loads(line)
            assert len(pids) >= 3 and all(pid_alive(pid) for pid in pids[:3])
            launcher.send_signal(sig)
            launcher.wait(timeout=60)
            assert_all_gone(pids)
        finally:
            if launcher.poll() is None:
                launcher.kill()


@pytest.mark.slow
def test_dead_process_is_reported_with_its_log(tmp_path):
    with Deployment(tmp_path, 1, DeploymentOptions(startup_timeout_seconds=90)) as deployment:
        (supernode,) = [process for process in deployment.processes if process.name == "supernode-0"]
        supernode.popen.send_signal(signal.SIGKILL)
        supernode.popen.wait(timeout=10)
        with pytest.raises(DeploymentError, match="supernode-0 exited") as error:
            deployment._check_alive(deployment.processes)
        assert "flower-supernode" in str(error.value)  # the tail of its log, which starts with the command


def _processes_mentioning(text: str) -> list:
    import psutil

    found = []
    for process in psutil.process_iter(["pid", "cmdline"]):
        if any(text in part for part in process.info["cmdline"] or []):
            found.append(process)
    return found


@pytest.mark.slow
def test_flwr_run_dot_on_flowers_default_local_simulation(tiny_model_dir, tmp_path):
    """`flwr run .` on a fresh machine: Flower's default configuration starts a local simulation SuperLink
    with 2 SuperNodes. A 3-client config runs with one client per SuperNode and says so; without
    `clients-from-federation` it fails at once, saying how to resize. `flwr log` (streamed) shows both."""
    import yaml

    config_file = tmp_path / "run.yaml"
    config_file.write_text(yaml.safe_dump(tiny_config(tiny_model_dir, num_clients=3).to_dict()))
    home = tmp_path / "flwr-home"  # empty: Flower writes its default configuration
    http_port, control_port = free_ports(2)
    env = {
        **os.environ,
        "FLWR_HOME": str(home),
        "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(http_port),
        "FLWR_LOCAL_CONTROL_API_PORT": str(control_port),
        # Tests never reach the network: Flower 1.42 would otherwise `uv sync` the app's dependencies per run.
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
        "PYTHONPATH": str(REPO_PYPROJECT.parent),
    }
    flwr = str(Path(sys.executable).parent / "flwr")

    def flwr_run(out: Path, *extra: str) -> str:
        run_config = " ".join([f"config-file='{config_file}'", f"out-dir='{out}'", *extra])
        command = [flwr, "run", str(REPO_PYPROJECT.parent), "--run-config", run_config, "--stream"]
        done = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=280)
        return done.stdout + done.stderr

    try:
        output = flwr_run(tmp_path / "adapted")
        assert "running with the federation's 2 simulated SuperNodes" in output, output[-3000:]
        record = json.loads((tmp_path / "adapted" / "federation.json").read_text())
        assert record["status"] == "completed"
        assert [row["round"] for row in record["result"]["history"]] == [1, 2]
        assert len({row["node_id"] for row in record["result"]["clients"]}) == 2
        assert "blindtune: federation completed: llm_zero_shot" in output

        # 280 s < the 300 s a ServerApp waiting for 3 SuperNodes would take: it must say so at once.
        output = flwr_run(tmp_path / "too-few", "clients-from-federation=false")
        assert "the run needs 3 SuperNodes and the simulated federation has 2" in output, output[-3000:]
        assert "num-supernodes=3" in output
        assert not (tmp_path / "too-few" / "federation.json").exists()
        runs = subprocess.run([flwr, "ls", "--format", "json"], env=env, cwd=tmp_path, capture_output=True, text=True)
        statuses = sorted(run["status"] for run in json.loads(runs.stdout[runs.stdout.index("{") :])["runs"])
        assert statuses == ["finished:completed", "finished:failed"], statuses
    finally:
        # Flower keeps its local SuperLink running for later `flwr` commands; this test started it.
        leftovers = _processes_mentioning(str(home))
        pids = [p.pid for p in leftovers] + [c.pid for p in leftovers for c in _children(p)]
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        assert_all_gone(pids)


def _children(process) -> list:
    try:
        return process.children(recursive=True)
    except Exception:
        return []


def choice_rows(count: int, start: int) -> list[dict]:
    colours = ["red", "green", "blue"]
    return [
        {"text": f"the colour of item {k}", "choices": colours, "label": k % 3} for k in range(start, start + count)
    ]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.mark.slow
def test_across_hosts_recipe_on_loopback_addresses(tiny_model_dir, tmp_path):
    """docs/deployment.md's across-hosts recipe, each party on its own loopback address and in its own
    directory: the SuperLink (TLS, SuperNode authentication) on 127.0.0.2, two client organisations with
    their own data, keys and work directories (`blindtune supernode`, ClientApp on 127.0.0.3/.4), and the
    experimenter's `flwr run`. Afterwards Ctrl-C ends each organisation's processes."""
    import yaml

    from blindtune.federation.deployment import write_node_key_pair

    server, orgs = tmp_path / "server", [tmp_path / "org-0", tmp_path / "org-1"]
    write_jsonl(server / "task" / "train.jsonl", choice_rows(12, 1000))
    write_jsonl(server / "task" / "test.jsonl", choice_rows(12, 2000))
    own_rows = [30, 50]  # each organisation's own file; a single file is split 80/10/10, 90% is trained on
    for org, count, start in zip(orgs, own_rows, (0, 100), strict=True):
        write_jsonl(org / "data.jsonl", choice_rows(count, start))
    config = tiny_config(tiny_model_dir).to_dict()
    config["task"] = str(server / "task")
    (server / "run.yaml").write_text(yaml.safe_dump(config))
    tls = make_tls_files(server / "certs", address="127.0.0.2")
    superlink_port, *runtime_ports = free_ports(3)
    home = server / "flwr-home"
    home.mkdir()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "recipe"\n\n[superlink.recipe]\naddress = "127.0.0.2:{superlink_port}"\n'
        f'root-certificates = "{tls.ca_cert}"\n'
    )
    env = {
        **os.environ,
        "FLWR_HOME": str(home),
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
        "PYTHONPATH": str(REPO_PYPROJECT.parent),  # every host has blindtune installed; here: this checkout
    }
    bin_dir = Path(sys.executable).parent
    processes: list[subprocess.Popen] = []

    def start(command: list[str], cwd: Path, log_name: str) -> subprocess.Popen:
        log_file = (cwd / log_name).open("w")
        process = subprocess.Popen(command, cwd=cwd, env=env, stdout=log_file, stderr=subprocess.STDOUT)
        processes.append(process)
        return process

    def flwr(*args: str, timeout: float = 120) -> str:
        done = subprocess.run(
            [str(bin_dir / "flwr"), *args], cwd=server, env=env, capture_output=True, text=True, timeout=timeout
        )
        return done.stdout + done.stderr

    try:
        # The server organisation's host (docs/deployment.md, "Across hosts", step 1).
        start(
            [
                str(bin_dir / "flower-superlink"),
                *("--host", "127.0.0.2", "--port", str(superlink_port)),
                *("--ssl-ca-certfile", str(tls.ca_cert), "--ssl-certfile", str(tls.server_cert)),
                *("--ssl-keyfile", str(tls.server_key)),
                "--enable-supernode-auth",
                "--disable-runtime-dependency-installation",
            ],
            server,
            "superlink.log",
        )

        def online_nodes() -> int | None:  # None: the SuperLink does not answer yet
            reply = flwr("supernode", "ls", "recipe", "--format", "json")
            if '"success": true' not in reply:
                return None
            return len([node for node in json.loads(reply[reply.index("{") :])["nodes"] if node["status"] == "online"])

        deadline = time.monotonic() + 90
        while online_nodes() is None:
            assert time.monotonic() < deadline, (server / "superlink.log").read_text()[-3000:]
            time.sleep(1)
        # Each client organisation makes its key pair and hands the public key to the server's operator.
        for i, org in enumerate(orgs):
            public_key = write_node_key_pair(org / "keys" / "node").with_suffix(".pub")
            assert '"success": true' in flwr("supernode", "register", str(public_key), "recipe", "--format", "json")
            (org / "certs").mkdir()
            (org / "certs" / "ca.pem").write_bytes(tls.ca_cert.read_bytes())
            start(
                [
                    sys.executable,
                    *("-m", "blindtune.cli", "supernode"),
                    *("--superlink", f"127.0.0.2:{superlink_port}", "--root-certificates", "certs/ca.pem"),
                    *("--auth-key", "keys/node", "--partition-id", str(i), "--num-partitions", "2"),
                    *("--data", "data.jsonl", "--workdir", "work"),
                    *("--runtime-address", f"127.0.0.{3 + i}:{runtime_ports[i]}"),
                ],
                org,
                "supernode.log",
            )
        deadline = time.monotonic() + 120
        while (online_nodes() or 0) < 2:
            assert time.monotonic() < deadline and all(p.poll() is None for p in processes), "SuperNodes not online"
            time.sleep(1)
        # The experimenter.
        run_config = f"config-file='{server / 'run.yaml'}' out-dir='{server / 'out'}' clients-from-federation=false"
        output = flwr("run", str(REPO_PYPROJECT.parent), "recipe", "--run-config", run_config, "--stream", timeout=400)
        record = json.loads((server / "out" / "federation.json").read_text())
        assert record["status"] == "completed", output[-3000:]
        assert record["failures"] == []
        # Each organisation trained on its own rows, and kept its state in its own directory.
        trained = sorted(row["num_examples"] for row in record["result"]["clients"] if row["round"] == 1)
        assert trained == [count - count // 10 for count in own_rows]
        for i, org in enumerate(orgs):
            assert (org / "work" / "clients" / f"client-{i}" / "artefact.safetensors").is_file()
        assert not (server / "out" / "clients").exists()
    finally:
        supernodes, superlink = processes[1:], processes[:1]
        trees = {p.pid: [c.pid for c in _children_of(p.pid)] for p in processes}
        for process in supernodes:  # Ctrl-C, as the organisation would press it
            process.send_signal(signal.SIGINT)
        for process in superlink:
            for pid in trees[process.pid]:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)
            process.terminate()
        codes = [process.wait(timeout=60) for process in processes]
        assert_all_gone([pid for p in processes for pid in [p.pid, *trees[p.pid]]])
    assert codes[1:] == [130, 130]


def _children_of(pid: int) -> list:
    import psutil

    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []


@pytest.mark.slow
def test_killed_client_process_is_restarted_and_rebuilds_from_its_work_directory(tiny_model_dir, tmp_path):
    """Client 1's warm ClientApp process is killed after round 1: the launcher starts it again, the new
    process rebuilds the client from its work directory, and the run ends with both clients answering."""
    import threading

    from blindtune.federation import deployment as deployment_module

    config = run_config_from_dict(
        {
            **tiny_config(tiny_model_dir, rounds=3).to_dict(),
            "federation": {"num_clients": 2, "rounds": 3, "min_clients": 1, "client_timeout_seconds": 90},
        }
    )
    killed: list[int] = []

    def kill_client_1_after_round_1() -> None:
        deadline = time.monotonic() + 600
        while not (tmp_path / "checkpoints" / "round-0001").is_dir() and time.monotonic() < deadline:
            time.sleep(0.2)
        for live in list(deployment_module._LIVE):
            for process in live.processes:
                if process.name == "clientapp-1":
                    killed.append(process.popen.pid)
                    process.popen.kill()

    killer = threading.Thread(target=kill_client_1_after_round_1, daemon=True)
    killer.start()
    results = launch(config, tmp_path, num_clients=2, progress=False)
    killer.join(timeout=5)
    assert killed, "client 1's process was not killed"
    assert [row["round"] for row in results["history"]] == [1, 2, 3]
    assert len([row for row in results["clients"] if row["round"] == 3]) == 2  # the restarted client answered
    log_text = (tmp_path / "logs" / "clientapp-1.log").read_text()
    assert log_text.count("$ ") == 2 and log_text.count("first message") == 2, log_text[-2000:]
    assert not pid_alive(killed[0])


@pytest.mark.slow
def test_secure_aggregation_on_warm_clients_gives_the_in_process_aggregate(tiny_model_dir, tmp_path):
    """SecAgg+ keeps its per-client state in Flower's Context between messages: warm ClientApp processes
    hand it back to their SuperNodes as `flwr-clientapp` does, so the deployed run aggregates the same
    client updates (up to SecAgg+'s stochastic rounding to its quantisation step)."""
    from safetensors.torch import load_file

    from blindtune.conftest import tiny_run_config
    from blindtune.privacy.config import SecAggConfig
    from blindtune.runner import run_experiment

    overrides = {
        "federation": {"num_clients": 3, "rounds": 1},
        "privacy": {"secagg": {"enabled": True}},
        "eval": {"every_round": False},
        "baselines": {"centralized": False, "local_only": False},
    }
    config = tiny_run_config("offsite", tiny_model_dir, overrides)
    in_process = run_experiment(config, tmp_path / "in-process", progress=False)
    deployed = launch(config, tmp_path / "launch", progress=False)
    final = "checkpoints/round-0001/adapter.safetensors"
    expected, got = load_file(tmp_path / "in-process" / final), load_file(tmp_path / "launch" / final)
    assert expected.keys() == got.keys()
    # Each run is within len(clients) steps / summed scales of the plain mean (secagg_test.py): so within twice that.
    step = deployed["privacy"]["secagg"]["quantization_step"]
    scales = [row["num_examples"] / SecAggConfig().max_weight for row in deployed["clients"]]
    assert max(float((expected[k] - got[k]).abs().max()) for k in expected) <= 2 * len(scales) * step / sum(scales)
    assert sorted(row["train_loss"] for row in deployed["clients"]) == sorted(
        row["train_loss"] for row in in_process["clients"]
    )
    assert deployed["failures"] == [] and deployed["privacy"]["secagg"]["enabled"]
    assert "adapter" not in deployed["cost"]["bytes_by_kind"]["to_server"]  # masked vectors only


@pytest.mark.slow
def test_killed_superlink_ends_the_launch_and_resume_finishes_the_run(tiny_model_dir, tmp_path):
    """The SuperLink is killed after round 1: `blindtune launch` fails with its log and leaves no process;
    `blindtune launch --resume` continues after round 1 and finishes the run."""
    import psutil
    import yaml

    config_file = tmp_path / "run.yaml"
    config_file.write_text(yaml.safe_dump(tiny_config(tiny_model_dir, rounds=3).to_dict()))
    out = tmp_path / "out"
    command = [sys.executable, "-m", "blindtune.cli", "launch", str(config_file), "--out", str(out)]
    launcher = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 300
        while not (out / "checkpoints" / "round-0001" / "meta.json").is_file():
            assert launcher.poll() is None and time.monotonic() < deadline, "the launch ended before round 1"
            time.sleep(0.2)
        descendants = psutil.Process(launcher.pid).children(recursive=True)
        (superlink,) = [p for p in descendants if "flower-superlink" in " ".join(p.cmdline())]
        superlink.kill()
        output, _ = launcher.communicate(timeout=120)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert launcher.returncode == 2 and "superlink exited" in output, output[-3000:]
    assert not (out / "results.json").exists()
    _, alive = psutil.wait_procs(descendants, timeout=30)
    assert [p for p in alive if p.status() != psutil.STATUS_ZOMBIE] == [], alive

    resumed = subprocess.run([*command, "--resume"], capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, (resumed.stdout + resumed.stderr)[-3000:]
    history = json.loads((out / "results.json").read_text())["history"]
    assert [row["round"] for row in history] == [1, 2, 3]
    assert (out / "checkpoints" / "round-0003" / "adapter.safetensors").is_file()
