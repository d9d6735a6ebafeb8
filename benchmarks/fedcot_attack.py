"""FedCoT's privatised prompts against two attackers, per epsilon, without training.

    python -m benchmarks.fedcot_attack blindtune/configs/fedcot_wordnet_3clients.yaml \
        --epsilons 10,30,50,75 --prompts 40 --out benchmarks/results/fedcot-attack

Each client privatises its prompts exactly as in a FedCoT run of the config (same SLM embedding
table, template, allocation and seeds), so the privatised prompts are those a sweep run sends. Two
attacks on them: nearest-neighbour inversion (`unchanged_rate`: the share of private tokens the
mechanism left as they were, which is all that attack finds) and `LikelihoodAttacker`, the server's
real attack: the mechanism's likelihood times the LLM's prior over the context, argmax
(`lm_recovery_rate`). The per-prompt (per-record) epsilon of the text channel is reported beside them.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

from blindtune.config import merge
from blindtune.federation.apps import client_partitions
from blindtune.methods import load_run_config
from blindtune.methods.fedcot.client import input_embeddings
from blindtune.methods.fedcot.server import build_slm
from blindtune.models import load_model
from blindtune.privacy.text_privatisation import (
    ExponentialMechanism,
    LikelihoodAttacker,
    privatise_prompts,
    recovery_attack,
    template_lines,
    vocabulary_candidates,
)
from blindtune.report import markdown_table


def attack_table(
    config_path: Path, epsilons: list[float], prompts: int, settings: dict[str, Any] | None = None
) -> list[dict[str, Any]]:
    rows = []
    base = load_run_config(config_path, settings)
    llm = load_model(base.model)
    slm = build_slm(llm, base, progress=False)
    table = input_embeddings(slm.model)
    mechanism = ExponentialMechanism(table, vocabulary_candidates(slm.tokenizer, table.shape[0]))
    attacker = LikelihoodAttacker(mechanism, llm.model)
    for epsilon in epsilons:
        privatisation = {"fedcot": {"privatisation": {"epsilon": epsilon}}}
        config = load_run_config(config_path, merge(settings or {}, privatisation))
        method = config.method_config
        private = []
        for partition, examples in enumerate(client_partitions(config)):
            template = template_lines([e.prompt for e in examples], method.privatisation.template_share)
            chosen = [e.prompt for e in examples[: method.prompts_per_client]][:prompts]
            seed = config.seed * 1_000_003 + partition  # the client's own seed (methods.fedcot.client)
            private += privatise_prompts(chosen, slm.tokenizer, mechanism, method.privatisation, template, seed)
        nearest = recovery_attack(mechanism, private, method.privatisation.attack_top_k)
        likelihood = attacker.attack(private)
        per_prompt = [p.epsilon for p in private]
        rows.append(
            {
                "epsilon_per_token_configured": epsilon,
                "epsilon_per_prompt_max": max(per_prompt),
                "epsilon_per_prompt_mean": sum(per_prompt) / len(per_prompt),
                "prompts": len(private),
                "private_tokens": likelihood["tokens"],
                "unchanged_rate": likelihood["unchanged_rate"],
                "nearest_neighbour_top_k": nearest[f"recovery_rate_top{method.privatisation.attack_top_k}"],
                "lm_recovery_rate": likelihood["lm_recovery_rate"],
            }
        )
        print(rows[-1], flush=True)
    return rows


def markdown(rows: list[dict[str, Any]], config: str) -> str:
    lines = [
        f"# FedCoT: recovery of private tokens from privatised prompts ({config})",
        "",
    ]
    header = [
        "epsilon per prompt (max / mean)",
        "epsilon per token (configured mean)",
        "prompts",
        "private tokens",
        "unchanged (nearest-neighbour top 1)",
        "LLM-prior likelihood attack, top 1",
    ]
    cells = [
        [
            f"{row['epsilon_per_prompt_max']:.0f} / {row['epsilon_per_prompt_mean']:.1f}",
            f"{row['epsilon_per_token_configured']:g}",
            str(row["prompts"]),
            str(row["private_tokens"]),
            f"{row['unchanged_rate']:.1%}",
            f"{row['lm_recovery_rate']:.1%}",
        ]
        for row in rows
    ]
    lines += markdown_table(header, cells)
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", type=Path)
    parser.add_argument("--epsilons", default="10,30,50,75")
    parser.add_argument("--prompts", type=int, default=40, help="privatised prompts attacked per client")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    epsilons = [math.inf if e.strip() == "inf" else float(e) for e in args.epsilons.split(",")]
    rows = attack_table(args.config, epsilons, args.prompts)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "attack.json").write_text(json.dumps({"config": str(args.config), "rows": rows}, indent=2))
    (args.out / "README.md").write_text(markdown(rows, str(args.config)))


if __name__ == "__main__":
    main()
