"""Reference rows are cached by exactly the settings that decide them."""

import dataclasses

from blindtune.conftest import tiny_run_config
from blindtune.federation.engine import Engine
from blindtune.reference_rows import cached_reference, llm_fingerprint


def test_a_reference_row_is_reused_only_for_the_same_inputs(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("BLINDTUNE_CACHE", str(tmp_path / "cache"))
    config = tiny_run_config("offsite", tiny_model_dir)
    calls: list[float] = []
    fingerprint = llm_fingerprint(config)

    def compute(value: float):
        return lambda: calls.append(value) or value

    first = cached_reference("centralized", config, compute(0.5), fingerprint)
    assert (first.value, first.from_cache) == (0.5, False)
    # How the federation runs and which rows are asked for do not decide the row.
    same = dataclasses.replace(
        config,
        federation=dataclasses.replace(config.federation, engine=Engine.SIMULATION),
        baselines=dataclasses.replace(config.baselines, local_only=False),
    )
    again = cached_reference("centralized", same, compute(0.9), fingerprint)
    assert (again.value, again.from_cache) == (0.5, True)
    # The budget, the data split (seed) and the row itself do; and a row asked not to be cached is recomputed.
    longer = dataclasses.replace(config, train=dataclasses.replace(config.train, steps=3))
    assert cached_reference("centralized", longer, compute(0.7), fingerprint).value == 0.7
    assert cached_reference("centralized", dataclasses.replace(config, seed=1), compute(0.6), fingerprint).value == 0.6
    assert cached_reference("local_only", config, compute(0.4), fingerprint).value == 0.4
    assert cached_reference("centralized", config, compute(0.3), fingerprint, use_cache=False).value == 0.3
    assert calls == [0.5, 0.7, 0.6, 0.4, 0.3]
