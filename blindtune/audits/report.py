"""The privacy/utility trade-off table: utility, epsilon, delta, MIA and misuse figures, one row a run."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from blindtune.report import MISSING, markdown_table, run_labels

SECTION_TITLE = "## Privacy and utility"
_SECTION = re.compile(rf"\n*{re.escape(SECTION_TITLE)}\n.*?(?=\n## |\Z)", re.DOTALL)

COLUMNS = (
    "run",
    "LLM zero-shot",
    "plug-in",
    "client ε (δ)",
    "server ε (δ)",
    "SecAgg+",
    "MIA AUC loss",
    "MIA AUC ratio",
    "TPR@1%FPR loss/ratio",
    "artefact acc",
    "artefact+adapter acc",
    "ppl artefact/LLM",
    "ledger",
)


def _percent(value: Any) -> str:
    return MISSING if value is None else f"{100 * float(value):.1f}%"


def _number(value: Any, digits: int = 3) -> str:
    return MISSING if value is None else f"{float(value):.{digits}g}"


def _epsilon(section: dict[str, Any]) -> str:
    if not section.get("enabled"):
        return "off"
    epsilon = section.get("epsilon")
    return f"{'∞' if epsilon is None else f'{epsilon:.3g}'} ({_number(section.get('delta'), 2)})"


def privacy_row(label: str, run: dict[str, Any]) -> list[str]:
    metrics = run.get("metrics", {})
    privacy = run.get("privacy", {})
    mia = privacy.get("membership_inference", {})
    misuse = privacy.get("misuse", {})
    ledger = privacy.get("ledger")
    loss, ratio = mia.get("loss", {}), mia.get("loss_ratio", {})
    tpr = f"{_percent(loss.get('tpr_at_1pct_fpr'))} / {_percent(ratio.get('tpr_at_1pct_fpr'))}" if loss else MISSING
    emulator = privacy.get("emulator", {})  # what OT / LLEOT measured on the server's held-out public text
    if "artefact_perplexity" in misuse:
        ppl = f"{misuse['artefact_perplexity']:.1f} / {misuse['llm_perplexity']:.1f}"
    elif "emulator_ppl" in emulator:
        ppl = f"{emulator['emulator_ppl']:.1f} / {emulator['llm_ppl']:.1f}"
    else:
        ppl = MISSING
    return [
        label,
        _percent(metrics.get("llm_zero_shot")),
        _percent(metrics.get("plugin")),
        _epsilon(privacy.get("dp", {})),
        _epsilon(privacy.get("server_dp", {})),
        "on" if privacy.get("secagg", {}).get("enabled") else "off",
        _number(loss.get("auc")),
        _number(ratio.get("auc")),
        tpr,
        _percent(misuse.get("artefact_accuracy", metrics.get("emulator_zero_shot"))),
        _percent(misuse.get("artefact_adapted_accuracy")),
        ppl,
        MISSING if ledger is None else ("passed" if ledger.get("passed") else f"{ledger.get('raw_text_leaks')} leaks"),
    ]


def privacy_table(runs: Sequence[dict[str, Any]], labels: Sequence[str] | None = None) -> list[str]:
    labels = list(labels) if labels is not None else run_labels(runs)
    return markdown_table(COLUMNS, [privacy_row(label, run) for label, run in zip(labels, runs, strict=True)])


def privacy_markdown(runs: Sequence[dict[str, Any]], labels: Sequence[str] | None = None) -> str:
    return "\n".join(
        [
            SECTION_TITLE,
            "",
            "Utility next to what privacy cost and what the audits found: ε at δ from the accountants "
            "(client: DP-SGD per example, the largest client's; server: per client); MIA: membership-inference "
            "ROC-AUC (0.5 = chance) of the loss and reference loss-ratio attacks on the plugged-in LLM; "
            "artefact: what the server handed out, used standalone.",
            "",
            *privacy_table(runs, labels),
        ]
    )


def add_privacy_section(report: Path, runs: Sequence[dict[str, Any]], labels: Sequence[str] | None = None) -> None:
    """Put (or replace) the privacy section in a report.md, after its summary table."""
    if not any("privacy" in run for run in runs):
        return
    text = report.read_text(encoding="utf-8") if report.is_file() else ""
    text = _SECTION.sub("", text).rstrip("\n")
    section = privacy_markdown(runs, labels)
    head, marker, tail = text.partition("\n## ")
    text = f"{head.rstrip()}\n\n{section}\n" + (f"\n## {tail}" if marker else "")
    report.write_text(text.rstrip("\n") + "\n", encoding="utf-8")
