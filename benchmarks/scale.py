"""Scale: wall time and peak memory of simulated federations of 2 to 100 clients on a tiny model.

    python -m benchmarks.scale [--clients 2 8 32 100] [--simulation-clients 8] [--out DIR]

Each point is a fresh Python process running one offsite-tuning experiment (1 round, 1 step of 2
examples per client, a tiny random model of the default architecture) so that its peak memory is
its own. Peak memory is the sampled resident memory of that process and all its descendants (Ray's
workers on the simulation engine). Per added client: the least-squares slope over the points.

Clients are not all resident at once: a client exists only while it answers a message (the ClientApp
rebuilds the emulator from its work directory, trains, replies, and drops it); what grows with the
number of clients is the server's per-client state (the replies it aggregates) and, on disk, each
client's copy of the emulator. `resident_clients_check` compares the memory slope with the size of
one client's model.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.common import TreeMemorySampler, federation_overhead, machine, timed_exchanges

MIB = 1024 * 1024


def make_tiny_model(directory: Path, num_layers: int = 4, hidden_size: int = 32) -> Path:
    """A tiny random model of the default architecture saved as a Hugging Face directory."""
    from blindtune.models import tiny_model

    if not (directory / "config.json").is_file():
        loaded = tiny_model(num_layers=num_layers, hidden_size=hidden_size)
        loaded.model.save_pretrained(directory)
        loaded.tokenizer.save_pretrained(directory)
    return directory


def point_config(model_dir: Path, num_clients: int, engine: str) -> dict[str, Any]:
    return {
        "method": "offsite",
        "model": str(model_dir),
        "task": "wordnet-supersense",
        "federation": {"num_clients": num_clients, "rounds": 1, "engine": engine},
        "train": {"steps": 1, "batch_size": 2, "max_length": 64},
        "eval": {"limit": 4, "batch_size": 4, "every_round": False},
        "baselines": {"centralized": False, "local_only": False},
        "offsite": {"adapter_layers_per_side": 1, "middle_keep_every": 2},
    }


def run_point(model_dir: Path, num_clients: int, engine: str, out_dir: Path) -> dict[str, Any]:
    """One experiment in this process (called in the child): timings, ledger, overhead."""
    import os

    from blindtune.methods import run_config_from_dict
    from blindtune.runner import run_experiment

    config = run_config_from_dict(point_config(model_dir, num_clients, engine))
    started = time.perf_counter()
    cpu_started = time.process_time()
    with timed_exchanges() as timings:
        results = run_experiment(config, out_dir, progress=False)
    wall = time.perf_counter() - started
    parallelism = max(1, (os.cpu_count() or 2) // max(1, (os.cpu_count() or 2) // 2)) if engine == "simulation" else 1
    overhead = federation_overhead(timings, results["clients"], parallelism)
    client_dir = out_dir / "clients"
    disk = sum(f.stat().st_size for f in client_dir.rglob("*") if f.is_file()) if client_dir.is_dir() else 0
    return {
        "engine": engine,
        "clients": num_clients,
        "wall_seconds": wall,
        "federation_wall_seconds": results["cost"]["federation_wall_seconds"],
        "cpu_seconds_main_process": time.process_time() - cpu_started,
        "round_seconds": overhead["rounds"][0]["round_seconds"] if overhead["rounds"] else None,
        "round_overhead_seconds": overhead["mean_overhead_seconds"],
        "setup_seconds": overhead["setup_seconds"],
        "client_train_seconds_sum": sum(float(c.get("train_seconds", 0.0)) for c in results["clients"]),
        "replies": len(results["clients"]),
        "failures": len(results["failures"]),
        "bytes_to_clients": results["cost"]["bytes_to_clients"],
        "bytes_to_server": results["cost"]["bytes_to_server"],
        "client_disk_bytes": disk,
    }


def measure_point(model_dir: Path, num_clients: int, engine: str, work: Path, timeout: float) -> dict[str, Any]:
    """Run one point in a child process and sample its process tree's memory."""
    out_dir = work / f"{engine}-{num_clients}"
    shutil.rmtree(out_dir, ignore_errors=True)
    result_file = work / f"{engine}-{num_clients}.json"
    result_file.unlink(missing_ok=True)
    command = [
        sys.executable,
        "-m",
        "benchmarks.scale",
        "--point",
        str(num_clients),
        "--engine",
        engine,
        "--model-dir",
        str(model_dir),
        "--point-out",
        str(out_dir),
        "--point-result",
        str(result_file),
    ]
    started = time.perf_counter()
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    with TreeMemorySampler(child.pid) as sampler:
        try:
            output, _ = child.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            child.kill()
            output, _ = child.communicate()
    process_seconds = time.perf_counter() - started
    shutil.rmtree(out_dir, ignore_errors=True)  # 100 copies of the emulator: do not keep them
    if child.returncode != 0 or not result_file.is_file():
        return {"engine": engine, "clients": num_clients, "error": output[-2000:], "returncode": child.returncode}
    point = json.loads(result_file.read_text())
    point["process_seconds"] = process_seconds
    point["peak_tree_rss_bytes"] = sampler.peak_bytes
    return point


def slope(points: Sequence[dict[str, Any]], key: str) -> float | None:
    """Least-squares change of `key` per added client."""
    usable = [(p["clients"], p[key]) for p in points if p.get(key) is not None]
    if len(usable) < 2:
        return None
    n = len(usable)
    mean_x = sum(x for x, _ in usable) / n
    mean_y = sum(y for _, y in usable) / n
    var = sum((x - mean_x) ** 2 for x, _ in usable)
    return sum((x - mean_x) * (y - mean_y) for x, y in usable) / var if var else None


def measure_scale(
    clients: Sequence[int] = (2, 8, 32, 100),
    simulation_clients: Sequence[int] = (8,),
    num_layers: int = 4,
    hidden_size: int = 32,
    timeout: float = 1800,
    progress: bool = True,
) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="blindtune-scale-"))
    try:
        model_dir = make_tiny_model(work / "tiny-model", num_layers, hidden_size)
        model_bytes = sum(f.stat().st_size for f in model_dir.glob("*.safetensors"))
        points = []
        for engine, counts in (("inprocess", clients), ("simulation", simulation_clients)):
            for count in counts:
                point = measure_point(model_dir, count, engine, work, timeout)
                points.append(point)
                if progress:
                    shown = {k: point.get(k) for k in ("wall_seconds", "peak_tree_rss_bytes", "error")}
                    print(f"scale {engine} {count} clients: {shown}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    summary = {}
    for engine in ("inprocess", "simulation"):
        ok = [p for p in points if p["engine"] == engine and "error" not in p]
        summary[engine] = {
            "wall_seconds_per_client": slope(ok, "wall_seconds"),
            "round_seconds_per_client": slope(ok, "round_seconds"),
            "peak_rss_bytes_per_client": slope(ok, "peak_tree_rss_bytes"),
            "client_disk_bytes_per_client": slope(ok, "client_disk_bytes"),
        }
    per_client_memory = summary["inprocess"]["peak_rss_bytes_per_client"]
    emulator_bytes = _emulator_bytes(points)
    return {
        "model": f"tiny random {num_layers} layers x hidden {hidden_size} (default architecture and tokenizer)",
        "model_file_bytes": model_bytes,
        "emulator_bytes": emulator_bytes,
        "setting": "offsite, 1 round, 1 step x 2 examples per client, eval on 4 test examples",
        "points": points,
        "per_client": summary,
        "resident_clients_check": {
            "peak_rss_bytes_per_client": per_client_memory,
            "one_client_emulator_bytes": emulator_bytes,
            # All clients resident at once would add at least one emulator per client.
            "clients_resident_at_once": None
            if per_client_memory is None or not emulator_bytes
            else per_client_memory >= 0.5 * emulator_bytes,
        },
        "machine": machine(),
    }


def _emulator_bytes(points: Sequence[dict[str, Any]]) -> int | None:
    """One client's stored emulator: its share of the clients' disk use."""
    for point in points:
        if point.get("client_disk_bytes") and point.get("clients"):
            return int(point["client_disk_bytes"] / point["clients"])
    return None


def plot_scale(result: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (time_axes, memory_axes) = plt.subplots(1, 2, figsize=(10, 4))
    for engine, marker in (("inprocess", "o"), ("simulation", "s")):
        ok = sorted(
            (p for p in result["points"] if p["engine"] == engine and "error" not in p), key=lambda p: p["clients"]
        )
        if not ok:
            continue
        xs = [p["clients"] for p in ok]
        time_axes.plot(xs, [p["wall_seconds"] for p in ok], marker=marker, label=f"{engine}: run")
        time_axes.plot(xs, [p["round_seconds"] for p in ok], marker=marker, linestyle="--", label=f"{engine}: round")
        memory_axes.plot(xs, [p["peak_tree_rss_bytes"] / MIB for p in ok], marker=marker, label=engine)
    time_axes.set_xlabel("clients")
    time_axes.set_ylabel("wall time (s)")
    time_axes.set_title("Wall time")
    memory_axes.set_xlabel("clients")
    memory_axes.set_ylabel("peak resident memory (MiB)")
    memory_axes.set_title("Peak memory (process tree)")
    for axes in (time_axes, memory_axes):
        axes.grid(alpha=0.3)
        axes.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def scale_table(result: dict[str, Any]) -> list[str]:
    from blindtune.report import format_bytes, format_seconds, markdown_table

    header = ["engine", "clients", "run wall", "round wall", "round overhead", "peak memory", "client disk"]
    rows = []
    for p in result["points"]:
        if "error" in p:
            rows.append([p["engine"], str(p["clients"]), f"failed: {p['error'].splitlines()[-1][:80]}", "", "", "", ""])
            continue
        rows.append(
            [
                p["engine"],
                str(p["clients"]),
                format_seconds(p["wall_seconds"]),
                format_seconds(p["round_seconds"]),
                format_seconds(p["round_overhead_seconds"]),
                format_bytes(p["peak_tree_rss_bytes"]),
                format_bytes(p["client_disk_bytes"]),
            ]
        )
    for engine, slopes in result["per_client"].items():
        if slopes["wall_seconds_per_client"] is None:
            continue
        rows.append(
            [
                engine,
                "per added client",
                format_seconds(slopes["wall_seconds_per_client"]),
                format_seconds(slopes["round_seconds_per_client"]),
                "",
                format_bytes(slopes["peak_rss_bytes_per_client"]),
                format_bytes(slopes["client_disk_bytes_per_client"]),
            ]
        )
    return markdown_table(header, rows)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[2, 8, 32, 100])
    parser.add_argument("--simulation-clients", type=int, nargs="*", default=[8])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=32)
    parser.add_argument("--out", type=Path, default=None, help="write scale.json and scale.png here")
    # One point, in a child process (used by measure_point).
    parser.add_argument("--point", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--engine", default="inprocess", help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--point-out", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--point-result", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.point is not None:
        point = run_point(args.model_dir, args.point, args.engine, args.point_out)
        args.point_result.write_text(json.dumps(point))
        return
    result = measure_scale(args.clients, args.simulation_clients, args.layers, args.hidden)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "scale.json").write_text(json.dumps(result, indent=2))
        plot_scale(result, args.out / "scale.png")
    print("\n".join(scale_table(result)))


if __name__ == "__main__":
    main()
