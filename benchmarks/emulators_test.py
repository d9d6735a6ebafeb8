"""The emulator comparison end to end on a tiny model (one training step per stage)."""

from __future__ import annotations

import yaml

from benchmarks.emulators import markdown, measure
from blindtune.models import tiny_model


def test_every_emulator_is_measured_and_tabulated(tmp_path, monkeypatch):
    loaded = tiny_model(num_layers=8, hidden_size=32)
    loaded.model.save_pretrained(tmp_path / "model")
    loaded.tokenizer.save_pretrained(tmp_path / "model")
    monkeypatch.setenv("BLINDTUNE_CACHE", str(tmp_path / "cache"))  # trained emulators, not the real model
    short = {"batch_size": 2, "max_length": 16}
    config = {
        "method": "lleot",
        "model": str(tmp_path / "model"),
        "task": "wordnet-supersense",
        "lleot": {"public_text": "wordnet:adv", "distill": short, "elevation": short},
    }
    (tmp_path / "lleot.yaml").write_text(yaml.safe_dump(config))
    results = measure(tmp_path / "lleot.yaml", ["wordnet-supersense"], limit=4, jitters=[0.5], steps=1)
    names = [row["variant"] for row in results["emulators"]]
    assert names == ["OT-uniform", "OT-distilled", "LLEOT", "LLEOT, J = 0.5"]
    for row in results["emulators"]:
        assert row["ppl_ratio"] > 0 and set(row["gradient_cosine"]) == {"soft prompt", "LoRA"}
    # each emulator is measured on its own: untrained, distilled and elevated differ, and so do their
    # perplexities (one AdamW step moves each weight by about the learning rate, whatever J is)
    assert len({row["emulator_ppl"] for row in results["emulators"][:3]}) == 3
    assert "expected_ppl_ratio" not in results["emulators"][1] and "expected_ppl_ratio" in results["emulators"][2]
    table = markdown(results)
    assert table.count("\n| ") == 2 + len(names) and "LLEOT, J = 0.5" in table
