"""Score an exported PEFT adapter loaded with plain transformers + peft (no blindtune loading code).

    python3 scripts/score_peft_export.py EXPORT_DIR/adapter --task wordnet-supersense --limit 200 --batch-size 32

Loading is what any user does: the base from the adapter's `base_model_name_or_path`, then
`PeftModel.from_pretrained`. Only the score reuses blindtune's task data and scoring function, so the
figure is comparable with the run's plug-in row.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from blindtune.data import load_task
from blindtune.eval.tasks import evaluate_examples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("adapter", type=Path)
    parser.add_argument("--task", default="wordnet-supersense")
    parser.add_argument("--limit", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    base_dir = json.loads((args.adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), str(args.adapter)).eval()
    task = load_task(args.task)
    score = evaluate_examples(model, tokenizer, task.test[: args.limit], task.kind, batch_size=args.batch_size)
    print(f"{args.task} test[:{args.limit}] with {args.adapter} on {base_dir}: {score:.4f}")


if __name__ == "__main__":
    main()
