"""The `blindtune` command line: demo, run, eval, export."""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from blindtune.config import ConfigError, RunConfig, packaged_config, resolve_config
from blindtune.methods import load_run_config
from blindtune.models.device import Placement

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__, pretty_exceptions_enable=False)
console = Console()

DEMO_CONFIG = "offsite_wordnet_3clients.yaml"
DEMO_QUICK_CONFIG = "offsite_wordnet_3clients_quick.yaml"
CONFIG_HELP = "A run config YAML: a path, or the name of a config in blindtune/configs/."
SET_HELP = "Override one config field, e.g. --set train.steps=40 (repeatable; the value is YAML)."
DeviceOption = Annotated[
    str | None, typer.Option(help="auto (CUDA when present), cpu or cuda; overrides the config's `device`.")
]


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )


def _load(config_path: Path, overrides: dict | None = None, settings: list[str] | None = None) -> RunConfig:
    try:
        return load_run_config(resolve_config(config_path), overrides, settings or ())
    except ConfigError as error:
        console.print(f"[red]config error:[/red] {escape(str(error))}", soft_wrap=True)
        raise typer.Exit(2) from None


def _run(
    path: Path, out: Path, overrides: dict | None, settings: list[str] | None, verbose: bool, resume: bool = False
) -> None:
    from blindtune.report import rich_table
    from blindtune.runner import run_experiment

    _setup_logging(verbose)
    config = _load(path, overrides, settings)
    console.print(f"running [bold]{config.method}[/bold] on [bold]{config.task}[/bold] -> {out}")
    results = run_experiment(config, out, resume=resume)
    console.print(rich_table(results))
    console.print(f"results: {out / 'results.json'}\nreport:  {out / 'report.md'}")


@app.command()
def demo(
    quick: Annotated[bool, typer.Option(help="Small budget: about 5 minutes on 2 CPU cores.")] = False,
    out: Annotated[Path, typer.Option(help="Output directory.")] = Path("runs/demo"),
    settings: Annotated[list[str] | None, typer.Option("--set", help=SET_HELP)] = None,
    device: DeviceOption = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Offsite tuning of SmolLM2-135M-Instruct by 3 clients on the WordNet supersense task."""
    config = packaged_config(DEMO_QUICK_CONFIG if quick else DEMO_CONFIG)
    _run(config, out, _device(None, device), settings, verbose)


@app.command()
def run(
    config: Annotated[Path, typer.Argument(help=CONFIG_HELP)],
    out: Annotated[Path, typer.Option(help="Output directory.")] = Path("runs/run"),
    engine: Annotated[str | None, typer.Option(help="Override federation.engine: simulation or inprocess.")] = None,
    settings: Annotated[list[str] | None, typer.Option("--set", help=SET_HELP)] = None,
    resume: Annotated[bool, typer.Option(help="Continue the interrupted run in --out after its last round.")] = False,
    device: DeviceOption = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Run the experiment a YAML config describes."""
    overrides = {"federation": {"engine": engine}} if engine else None
    _run(config, out, _device(overrides, device), settings, verbose, resume)


def _device(overrides: dict | None, device: str | None) -> dict | None:
    return {**(overrides or {}), "device": device} if device else overrides


def _placement(device: str | None, bf16: bool = False) -> Placement:
    from blindtune.models.device import DeviceError, resolve_placement

    try:
        return resolve_placement(device or "auto", bf16)
    except (DeviceError, ValueError) as error:
        raise typer.BadParameter(str(error)) from None


@app.command()
def report(
    runs: Annotated[list[Path], typer.Argument(help="Run directories or results.json files.")],
    out: Annotated[Path, typer.Option(help="Where report.md and its plots go.")] = Path("runs/report"),
    title: Annotated[str, typer.Option(help="Page title.")] = "blindtune report",
) -> None:
    """Turn results.json files into one Markdown page with tables and PNG plots."""
    from blindtune.report import load_results, write_report

    page = write_report(load_results(runs), out, title=title)
    console.print(f"report: {page}")


@app.command("eval")
def evaluate(
    task: Annotated[
        str, typer.Option(help="Task name or path to a .jsonl/.csv multiple-choice file.")
    ] = "wordnet-supersense",
    data_dir: Annotated[Path | None, typer.Option(help="Directory with the task's files.")] = None,
    model: Annotated[str | None, typer.Option(help="Hugging Face model directory (default: embedded SmolLM2).")] = None,
    limit: Annotated[int | None, typer.Option(help="Evaluate on the first N test examples.")] = None,
    split: Annotated[str, typer.Option(help="train, validation or test.")] = "test",
    batch_size: Annotated[int, typer.Option()] = 32,
    length_normalized: Annotated[bool, typer.Option(help="Score options per character (acc_norm).")] = False,
    out: Annotated[Path | None, typer.Option(help="Write DIR/eval.json.")] = None,
    generate: Annotated[
        bool, typer.Option(help="Instruction data: also exact match and ROUGE-L of greedy responses.")
    ] = False,
    max_new_tokens: Annotated[int, typer.Option(help="With --generate: tokens per response at most.")] = 256,
    device: DeviceOption = None,
) -> None:
    """Zero-shot accuracy of a model on a task (instruction data: the responses' mean token NLL)."""
    from blindtune.data import TaskKind, load_task
    from blindtune.eval.tasks import evaluate_examples
    from blindtune.models import load_model
    from blindtune.models.device import placed

    if split not in {"train", "validation", "test"}:
        raise typer.BadParameter("split must be train, validation or test")
    started = time.perf_counter()
    with placed(_placement(device)):
        loaded = load_model(model)
    data = load_task(task, data_dir)
    examples = getattr(data, split)[:limit]
    score = evaluate_examples(
        loaded.model,
        loaded.tokenizer,
        examples,
        data.kind,
        batch_size=batch_size,
        length_normalized=length_normalized,
        desc=f"{task} {split}",
    )
    seconds = time.perf_counter() - started
    metric = "response_nll" if data.kind is TaskKind.INSTRUCTION else "accuracy"
    result = {
        "task": task,
        "model": loaded.name,
        "split": split,
        "num_examples": len(examples),
        metric: score,
        "seconds": seconds,
    }
    shown = (
        f"response NLL [bold]{score:.4f}[/bold] (perplexity {math.exp(score):.2f})"
        if metric != "accuracy"
        else f"accuracy [bold]{score:.4f}[/bold]"
    )
    if generate and metric != "accuracy":
        from blindtune.eval.instruction import evaluate_generated_responses

        generated = evaluate_generated_responses(
            loaded.model, loaded.tokenizer, examples, max_new_tokens=max_new_tokens, batch_size=batch_size
        )
        result.update({"exact_match": generated.exact_match, "rouge_l": generated.rouge_l})
        shown += f", exact match {generated.exact_match:.4f}, ROUGE-L {generated.rouge_l:.4f}"
    console.print(f"{task} ({split}, {len(examples)} examples): {shown} in {time.perf_counter() - started:.1f} s")
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "eval.json").write_text(json.dumps(result, indent=2))


@app.command("export")
def export_command(
    run_dir: Annotated[Path, typer.Argument(help="A run directory (with config.json and checkpoints/).")],
    out: Annotated[Path, typer.Option(help="Where merged/, adapter/ (and base/) go.")] = Path("runs/export"),
    round_number: Annotated[int | None, typer.Option("--round", help="Export this round (default: the last).")] = None,
    party: Annotated[
        str | None, typer.Option(help="Whose model: the server LLM (default) or client-N (FedCoT).")
    ] = None,
    device: DeviceOption = None,
) -> None:
    """The run's adapted model as a merged Hugging Face model and a PEFT adapter, each with a model card."""
    from blindtune.export import ExportError, export_run
    from blindtune.models.device import placed

    try:
        with placed(_placement(device)):
            exported = export_run(run_dir, out, round_number, party)
    except ExportError as error:
        console.print(f"[red]error:[/red] {error}")
        raise typer.Exit(2) from None
    console.print(f"exported round {exported.round} of {exported.rounds}")
    for label, path in (("merged", exported.merged), ("adapter", exported.adapter), ("base", exported.base)):
        if path is not None:
            console.print(f"{label + ':':9}{path}")
    for note in exported.notes:
        console.print(f"note: {note}")


@app.command()
def launch(
    config: Annotated[Path, typer.Argument(help=CONFIG_HELP)],
    clients: Annotated[int | None, typer.Option(help="SuperNodes to start (default: federation.num_clients).")] = None,
    out: Annotated[Path, typer.Option(help="Output directory; process logs go to OUT/logs/.")] = Path("runs/launch"),
    tls_ca_cert: Annotated[Path | None, typer.Option(help="CA certificate (PEM) the SuperNodes trust.")] = None,
    tls_server_cert: Annotated[Path | None, typer.Option(help="SuperLink certificate (PEM) for 127.0.0.1.")] = None,
    tls_server_key: Annotated[Path | None, typer.Option(help="SuperLink private key (PEM).")] = None,
    node_auth: Annotated[bool, typer.Option(help="SuperNode authentication with per-node keys (needs TLS).")] = False,
    timeout: Annotated[float | None, typer.Option(help="Give up on the run after this many seconds.")] = None,
    resume: Annotated[bool, typer.Option(help="Continue the interrupted run in --out after its last round.")] = False,
    settings: Annotated[list[str] | None, typer.Option("--set", help=SET_HELP)] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Run the experiment as a real Flower deployment: a SuperLink and one SuperNode per client, on loopback."""
    from blindtune.federation.deployment import DeploymentError, DeploymentOptions, TlsFiles
    from blindtune.report import rich_table
    from blindtune.runner import launch as launch_deployment

    _setup_logging(verbose)
    tls = None
    if tls_ca_cert and tls_server_cert and tls_server_key:
        tls = TlsFiles(tls_ca_cert, tls_server_cert, tls_server_key)
    elif tls_ca_cert or tls_server_cert or tls_server_key:
        raise typer.BadParameter("TLS needs all of --tls-ca-cert, --tls-server-cert and --tls-server-key")
    if clients is not None and clients < 1:
        raise typer.BadParameter("--clients must be >= 1")
    run_config = _load(config, settings=settings)
    count = clients or run_config.federation.num_clients
    console.print(
        f"launching [bold]{run_config.method}[/bold] on [bold]{run_config.task}[/bold]: 1 SuperLink + {count} "
        f"SuperNodes ({'TLS' if tls else 'insecure'}{', node auth' if node_auth else ''}) -> {out}"
    )
    options = DeploymentOptions(tls=tls, node_auth=node_auth, run_timeout_seconds=timeout)
    try:
        results = launch_deployment(run_config, out, count, options=options, resume=resume)
    except DeploymentError as error:
        console.print(f"[red]deployment failed:[/red] {error}\nlogs: {out / 'logs'}")
        raise typer.Exit(2) from None
    console.print(rich_table(results))
    console.print(f"results: {out / 'results.json'}\nreport:  {out / 'report.md'}\nlogs:    {out / 'logs'}")


@app.command()
def audit(
    runs: Annotated[list[Path], typer.Argument(help="Finished run directories (with results.json, checkpoints/).")],
    membership: Annotated[bool, typer.Option(help="Membership inference on the adapted LLM.")] = True,
    misuse: Annotated[bool, typer.Option(help="The handed-out artefact as a standalone model.")] = True,
    table: Annotated[Path | None, typer.Option(help="Also write the runs' privacy/utility table here (.md).")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Privacy audits of finished runs: update results.json's `privacy` section and report.md's table."""
    from blindtune.audits.audit import audit_run
    from blindtune.audits.report import privacy_markdown, privacy_row

    _setup_logging(verbose)
    audited = []
    for run_dir in runs:
        results = audit_run(run_dir, membership=membership, misuse=misuse, progress=verbose)
        audited.append(results)
        console.print(" | ".join(privacy_row(str(run_dir), results)))
    if table is not None:
        table.parent.mkdir(parents=True, exist_ok=True)
        table.write_text(privacy_markdown(audited, [str(r) for r in runs]) + "\n", encoding="utf-8")
        console.print(f"table: {table}")


def main() -> None:
    """Entry point: user errors (bad config, data, model path, adapter) end with a message, not a traceback."""
    from blindtune.data import DataFormatError, UnknownTaskError
    from blindtune.federation.rounds import TooFewClientsError
    from blindtune.methods import UnknownMethodError
    from blindtune.models import ModelLoadError
    from blindtune.models.adapters import IncompatibleAdapterError
    from blindtune.report import ResultsError
    from blindtune.runner import RunFailedError

    try:
        app()
    except (
        ConfigError,
        DataFormatError,
        UnknownTaskError,
        UnknownMethodError,
        ModelLoadError,
        ResultsError,
        IncompatibleAdapterError,
        RunFailedError,
        TooFewClientsError,
        FileNotFoundError,
    ) as error:
        console.print(f"[red]error:[/red] {error}")
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
