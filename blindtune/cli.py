"""The `blindtune` command line: demo, run, eval, export."""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Annotated, NoReturn

import typer
from rich.console import Console
from rich.markup import escape

from blindtune.config import ConfigError, RunConfig, packaged_config, resolve_config
from blindtune.federation.progress import PROGRESS_LOGGER
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


# `blindtune --debug CMD`: show the traceback of every error, user errors included.
_DEBUG = {"on": False}
# Libraries whose INFO/DEBUG lines drown the run's own output unless -v asks for them.
_CHATTY_LOGGERS = ("flwr", "ray", "filelock", "urllib3")


@app.callback()
def _options(
    debug: Annotated[bool, typer.Option("--debug", help="Show the full traceback of every error.")] = False,
) -> None:
    _DEBUG["on"] = debug


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    for name in _CHATTY_LOGGERS:
        logging.getLogger(name).setLevel(logging.DEBUG if verbose else logging.WARNING)
    logging.getLogger("flwr").propagate = verbose  # Flower prints through its own handler too: once is enough
    if not verbose:  # libraries' notices about their own future versions are for developers
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
    progress = logging.getLogger(PROGRESS_LOGGER)  # one plain line per round, at any verbosity
    if not progress.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        progress.addHandler(handler)
    progress.setLevel(logging.INFO)
    progress.propagate = False


def _load(config_path: Path, overrides: dict | None = None, settings: list[str] | None = None) -> RunConfig:
    try:
        return load_run_config(resolve_config(config_path), overrides, settings or ())
    except ConfigError as error:
        console.print(f"[red]config error:[/red] {escape(str(error))}", soft_wrap=True)
        raise typer.Exit(2) from None


def _interrupted(command: str, out: Path) -> NoReturn:
    """Ctrl-C: say what is kept and how to continue, then end (exit code 130, as the shell's)."""
    from blindtune.federation.engine import leftover_threads
    from blindtune.run_folder import last_complete_round

    last = last_complete_round(out)
    kept = f"round {last} is checkpointed" if last else "no round had finished"
    console.print(
        f"[yellow]interrupted:[/yellow] {kept}; continue with: blindtune {command} --out {out} --resume", soft_wrap=True
    )
    if leftover_threads():  # a server thread still busy with a round it cannot finish: don't wait for it
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(130)
    raise typer.Exit(130)


def _prepare_out(out: Path, overwrite: bool, resume: bool) -> None:
    from blindtune.run_folder import check_out_dir, clear_run_folder

    if overwrite and resume:
        raise typer.BadParameter("--overwrite starts clean, --resume continues: give one of them")
    check_out_dir(out)
    if overwrite and (removed := clear_run_folder(out)):
        console.print(f"--overwrite: removed {', '.join(removed)} from {out}")


def _run(
    path: Path,
    out: Path,
    overrides: dict | None,
    settings: list[str] | None,
    verbose: bool,
    resume: bool = False,
    overwrite: bool = False,
) -> None:
    from blindtune.report import rich_table
    from blindtune.runner import run_experiment

    _setup_logging(verbose)
    config = _load(path, overrides, settings)
    _prepare_out(out, overwrite, resume)
    console.print(f"running [bold]{config.method}[/bold] on [bold]{config.task}[/bold] -> {out}")
    try:
        results = run_experiment(config, out, resume=resume)
    except KeyboardInterrupt:
        _interrupted(f"run {path}", out)
    console.print(rich_table(results))
    console.print(f"results: {out / 'results.json'}\nreport:  {out / 'report.md'}")


@app.command()
def demo(
    quick: Annotated[bool, typer.Option(help="Small budget: about 5 minutes on 2 CPU cores.")] = False,
    out: Annotated[Path, typer.Option(help="Output directory.")] = Path("runs/demo"),
    settings: Annotated[list[str] | None, typer.Option("--set", help=SET_HELP)] = None,
    device: DeviceOption = None,
    resume: Annotated[bool, typer.Option(help="Continue the interrupted run in --out after its last round.")] = False,
    overwrite: Annotated[bool, typer.Option(help="Remove a previous run's outputs from --out first.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Offsite tuning of SmolLM2-135M-Instruct by 3 clients on the WordNet supersense task."""
    config = packaged_config(DEMO_QUICK_CONFIG if quick else DEMO_CONFIG)
    _run(config, out, _device(None, device), settings, verbose, resume, overwrite)


@app.command()
def run(
    config: Annotated[Path, typer.Argument(help=CONFIG_HELP)],
    out: Annotated[Path, typer.Option(help="Output directory.")] = Path("runs/run"),
    engine: Annotated[str | None, typer.Option(help="Override federation.engine: simulation or inprocess.")] = None,
    settings: Annotated[list[str] | None, typer.Option("--set", help=SET_HELP)] = None,
    resume: Annotated[bool, typer.Option(help="Continue the interrupted run in --out after its last round.")] = False,
    overwrite: Annotated[bool, typer.Option(help="Remove a previous run's outputs from --out first.")] = False,
    device: DeviceOption = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Run the experiment a YAML config describes."""
    if engine is not None and engine not in {"simulation", "inprocess"}:
        raise typer.BadParameter(f"{engine!r} is not simulation or inprocess", param_hint="--engine")
    overrides = {"federation": {"engine": engine}} if engine else None
    _run(config, out, _device(overrides, device), settings, verbose, resume, overwrite)


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
        str,
        typer.Option(
            help="Task name, a .jsonl/.csv multiple-choice file, or a folder with train.jsonl and test.jsonl "
            "(optionally validation.jsonl)."
        ),
    ] = "wordnet-supersense",
    data_dir: Annotated[
        Path | None,
        typer.Option(help="A registered task's files: its folder (e.g. data/piqa) or the folder holding it (data)."),
    ] = None,
    model: Annotated[str | None, typer.Option(help="Hugging Face model directory (default: embedded SmolLM2).")] = None,
    limit: Annotated[int | None, typer.Option(help="Evaluate on the first N test examples.")] = None,
    split: Annotated[str, typer.Option(help="train, validation or test.")] = "test",
    batch_size: Annotated[int, typer.Option()] = 32,
    length_normalized: Annotated[bool, typer.Option(help="Score options per character (acc_norm).")] = False,
    template: Annotated[
        str | None,
        typer.Option(help="Your rows' prompt, with {text} for the row's text (default \"{text}\\nAnswer:\")."),
    ] = None,
    choice_prefix: Annotated[
        str | None, typer.Option(help="Put before each of your rows' options when scored (default: one space).")
    ] = None,
    out: Annotated[Path | None, typer.Option(help="Write DIR/eval.json.")] = None,
    generate: Annotated[
        bool, typer.Option(help="Instruction data: also exact match and ROUGE-L of greedy responses.")
    ] = False,
    max_new_tokens: Annotated[int, typer.Option(help="With --generate: tokens per response at most.")] = 256,
    device: DeviceOption = None,
) -> None:
    """Zero-shot accuracy of a model on a task (instruction data: the responses' mean token NLL)."""
    from blindtune.config import EvalConfig
    from blindtune.data import TaskKind, load_task
    from blindtune.eval.tasks import evaluate_examples
    from blindtune.models import load_model
    from blindtune.models.device import placed
    from blindtune.run_folder import check_out_dir

    if split not in {"train", "validation", "test"}:
        raise typer.BadParameter("split must be train, validation or test")
    try:  # the same bounds as a run config's `eval` section
        EvalConfig(limit=limit, batch_size=batch_size)
    except ValueError as error:
        raise typer.BadParameter(str(error)) from None
    if out is not None:
        check_out_dir(out)  # before the work, whose result would be lost
    if template is not None:
        template = template.replace("\\n", "\n")  # a shell argument cannot easily hold a newline
    started = time.perf_counter()
    data = load_task(task, data_dir, template=template, choice_prefix=choice_prefix)
    with placed(_placement(device)):
        loaded = load_model(model)
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
    overwrite: Annotated[bool, typer.Option(help="Remove a previous run's outputs from --out first.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Run the experiment as a real Flower deployment: a SuperLink and one SuperNode per client, on loopback."""
    from blindtune.federation.deployment import DeploymentError, DeploymentOptions, TlsFiles
    from blindtune.report import rich_table
    from blindtune.runner import launch as launch_deployment

    _setup_logging(verbose)
    tls = None
    if tls_ca_cert and tls_server_cert and tls_server_key:
        tls = TlsFiles(tls_ca_cert, tls_server_cert, tls_server_key).resolved()  # they exist and are PEM
    elif tls_ca_cert or tls_server_cert or tls_server_key:
        raise typer.BadParameter("TLS needs all of --tls-ca-cert, --tls-server-cert and --tls-server-key")
    if clients is not None and clients < 1:
        raise typer.BadParameter("--clients must be >= 1")
    if timeout is not None and timeout <= 0:
        raise typer.BadParameter("--timeout must be > 0 seconds")
    run_config = _load(config, settings=settings)
    _prepare_out(out, overwrite, resume)
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
    except KeyboardInterrupt:
        _interrupted(f"launch {config}", out)
    console.print(rich_table(results))
    console.print(f"results: {out / 'results.json'}\nreport:  {out / 'report.md'}\nlogs:    {out / 'logs'}")


@app.command()
def supernode(
    superlink: Annotated[str, typer.Option(help="The SuperLink's HOST:PORT.")],
    partition_id: Annotated[int, typer.Option(help="Which client this organisation is: 0 .. num-partitions-1.")],
    num_partitions: Annotated[int, typer.Option(help="How many clients the run has (federation.num_clients).")],
    data: Annotated[
        Path | None, typer.Option(help="Your own data, in the run's task format (default: the task's slice).")
    ] = None,
    workdir: Annotated[Path | None, typer.Option(help="Your client's storage (default: the run's out-dir).")] = None,
    root_certificates: Annotated[Path | None, typer.Option(help="CA certificate (PEM) of the SuperLink's TLS.")] = None,
    insecure: Annotated[bool, typer.Option(help="Plain HTTP to the SuperLink (tests on one machine only).")] = False,
    auth_key: Annotated[Path | None, typer.Option(help="Private key for SuperNode authentication.")] = None,
    runtime_address: Annotated[
        str, typer.Option(help="Loopback HOST:PORT for this node's ClientApp process.")
    ] = "127.0.0.1:9094",
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Run one client organisation's Flower SuperNode (and its warm ClientApp process) on your own data."""
    from blindtune.federation.deployment import (
        SuperNodeSettings,
        run_supernode,
        supernode_command,
        warm_client_command,
    )

    _setup_logging(verbose)
    if insecure == (root_certificates is not None):
        raise typer.BadParameter("give --root-certificates (TLS) or --insecure", param_hint="--root-certificates")
    if not 0 <= partition_id < num_partitions:
        raise typer.BadParameter(f"must be in 0..{num_partitions - 1}", param_hint="--partition-id")
    for name, path in (("--data", data), ("--root-certificates", root_certificates), ("--auth-key", auth_key)):
        if path is not None and not path.exists():
            raise typer.BadParameter(f"{path} does not exist", param_hint=name)
    node = SuperNodeSettings(
        superlink=superlink,
        partition_id=partition_id,
        num_partitions=num_partitions,
        data=None if data is None else data.resolve(),
        workdir=None if workdir is None else workdir.resolve(),
        root_certificates=None if root_certificates is None else root_certificates.resolve(),
        auth_key=None if auth_key is None else auth_key.resolve(),
        runtime_address=runtime_address,
    )
    console.print(f"$ {' '.join(supernode_command(node))}\n$ {' '.join(warm_client_command(node))}", soft_wrap=True)
    code = run_supernode(node)
    if code == 130:
        console.print("[yellow]interrupted:[/yellow] the SuperNode and its ClientApp process are stopped")
    raise typer.Exit(code)


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
    """Entry point: an expected user error (bad config, data, model, run folder, file) ends with one line
    and exit code 2; anything else is a bug and keeps its traceback (`--debug` shows it for all)."""
    from blindtune.data import DataFormatError, UnknownTaskError
    from blindtune.federation.checkpoint import CheckpointError
    from blindtune.federation.deployment import DeploymentError
    from blindtune.federation.rounds import TooFewClientsError
    from blindtune.methods import UnknownMethodError
    from blindtune.models import ModelLoadError
    from blindtune.models.adapters import IncompatibleAdapterError
    from blindtune.report import ResultsError
    from blindtune.run_folder import RunFolderError
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
        RunFolderError,
        CheckpointError,
        DeploymentError,
        TooFewClientsError,
        OSError,
    ) as error:
        if _DEBUG["on"]:
            raise
        console.print(f"[red]error:[/red] {error}", soft_wrap=True)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
