"""The deployment engine: real SuperLink/SuperNode processes on loopback, with and without TLS."""

from __future__ import annotations

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


def make_tls_files(directory: Path) -> TlsFiles:
    """A throw-away CA and a SuperLink certificate for 127.0.0.1/localhost signed by it."""
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
        .subject_name(name("127.0.0.1"))
        .issuer_name(ca_cert.subject)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]),
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
        supernode = deployment.processes[-1]
        supernode.popen.send_signal(signal.SIGKILL)
        supernode.popen.wait(timeout=10)
        with pytest.raises(DeploymentError, match="supernode-0 exited") as error:
            deployment._check_alive(deployment.processes)
        assert "flower-supernode" in str(error.value)  # the tail of its log, which starts with the command
