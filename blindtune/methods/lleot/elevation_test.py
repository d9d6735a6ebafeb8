import copy
import math
from dataclasses import replace

import pytest
import torch

from blindtune.conftest import emulator_pair
from blindtune.eval.leakage import perplexities
from blindtune.methods.lleot.elevation import (
    Elevation,
    ElevationConfig,
    LowRankUpdate,
    SimulatedClient,
    elevate_emulator,
    elevated_teacher,
    elevation_loss,
    margin_scores,
    public_token_counts,
)
from blindtune.models import tiny_model
from blindtune.models.distill import (
    DistillConfig,
    ProxyPrompts,
    TextBatches,
    prepare_emulator,
)
from blindtune.models.surgery import build_emulator, plan_layers


def test_elevation_drives_the_measured_margin_toward_h(texts):
    # A random tiny model predicts almost uniformly, and its small head caps how much worse an emulator
    # can get, so H is small here; on SmolLM2-135M the default H = 4 is reached (see the LLEOT docs).
    wider = tiny_model(num_layers=6, hidden_size=64)
    llm, reference = wider.model, copy.deepcopy(wider.model)
    pair = emulator_pair(llm, keep_every=2)
    margin = 0.3
    before = perplexities(llm, pair.emulator, wider.tokenizer, texts.heldout[:40], max_length=16)
    config = ElevationConfig(margin=margin, steps=40, batch_size=4, max_length=16, learning_rate=5e-2)
    history = elevate_emulator(pair, wider.tokenizer, texts.train[:400], config, progress=False)
    after = perplexities(llm, pair.emulator, wider.tokenizer, texts.heldout[:40], max_length=16)
    measured_before, measured_after = math.log(before["ppl_ratio"]), math.log(after["ppl_ratio"])
    assert abs(measured_before - margin) > 0.25
    assert abs(measured_after - margin) < 0.5 * abs(measured_before - margin)
    assert sum(h["margin"] for h in history[-10:]) > sum(h["margin"] for h in history[:10]) + 0.5
    # the LLM itself is untouched: its adapter layers, perturbed during elevation, are restored exactly
    for a, b in zip(llm.parameters(), reference.parameters(), strict=True):
        assert torch.equal(a, b)


def test_margin_jitter_scores_are_standardised_on_public_text_and_secret(tiny, texts):
    vocabulary = tiny.model.get_output_embeddings().weight.shape[0]
    counts = public_token_counts(tiny.tokenizer, texts.train[:300], vocabulary)
    scores = margin_scores(tiny.model, counts, seed=0)
    assert scores.shape == (tiny.model.get_output_embeddings().weight.shape[0],)
    assert scores.min() >= -2.0 and scores.max() <= 2.0
    ids = torch.cat([torch.tensor(tiny.tokenizer(t)["input_ids"]) for t in texts.train[:300]])
    assert abs(scores[ids].mean().item()) < 0.1 and 0.8 < scores[ids].std().item() < 1.1  # on the public text
    assert torch.equal(scores, margin_scores(tiny.model, counts, seed=0))
    assert not torch.equal(scores, margin_scores(tiny.model, counts, seed=1))
    with pytest.raises(ValueError, match="margin_jitter"):
        ElevationConfig(margin=4.0, margin_jitter=2.0)


def test_elevation_targets_the_mean_margin_of_each_text_tokens(tiny, texts):
    pair = emulator_pair(tiny.model, keep_every=1)  # emulator == LLM: every measured margin is 0
    config = ElevationConfig(margin=4.0, adapter_weight_noise=0.0, proxy=ProxyPrompts(length=0))
    teacher = elevated_teacher(tiny.model, tiny.tokenizer, texts.train[:300], replace(config, margin_jitter=1.5), 0)
    token_margins = teacher.token_margins
    ids, mask = TextBatches(tiny.tokenizer, texts.train[:64], 16, seed=0).next(4)
    loss, parts = elevation_loss(pair, ids, mask, config, torch.Generator().manual_seed(0), teacher)
    predicted = mask[:, 1:].bool()
    expected = [token_margins[row[keep]].mean() for row, keep in zip(ids[:, 1:], predicted, strict=True)]
    assert parts["margin"] == pytest.approx(0.0, abs=1e-5)
    assert loss == pytest.approx(torch.stack(expected).mean().item(), rel=1e-4)


def test_the_elevated_teacher_is_an_exact_per_token_margin(tiny, texts):
    config = ElevationConfig(margin=4.0, margin_jitter=1.5, teacher_weight=1.0, absorbing_tokens=64)
    teacher = elevated_teacher(tiny.model, tiny.tokenizer, texts.train[:300], config, seed=0)
    vocabulary = teacher.token_margins.shape[0]
    counts = public_token_counts(tiny.tokenizer, texts.train[:300], vocabulary)
    assert teacher.absorbing.sum() == 64 and counts[teacher.absorbing].sum() == 0  # never in public text
    assert torch.equal(
        teacher.absorbing, elevated_teacher(tiny.model, tiny.tokenizer, texts.train[:300], config, 0).absorbing
    )
    assert not torch.equal(
        teacher.absorbing, elevated_teacher(tiny.model, tiny.tokenizer, texts.train[:300], config, 1).absorbing
    )

    reference = torch.randn(2, 5, vocabulary) * 3
    weights = torch.ones(2, 5)
    kept = ~teacher.absorbing
    # The teacher itself: p_LLM e^(-H_y) outside A, the rest of the mass spread over A.
    outside = reference.log_softmax(-1)[..., kept] - teacher.token_margins[kept]
    rest = (1 - outside.logsumexp(-1, keepdim=True).exp()).log() - math.log(64)
    exact = torch.empty_like(reference)
    exact[..., kept] = outside
    exact[..., teacher.absorbing] = rest.expand(-1, -1, 64)
    divergence, mass_error = teacher.loss(reference, exact, weights)
    assert divergence.item() == pytest.approx(0.0, abs=1e-4) and mass_error.item() == pytest.approx(0.0, abs=1e-4)
    token_margin = reference.log_softmax(-1) - exact.log_softmax(-1)  # -log p_emu(y) + log p_LLM(y)
    assert torch.allclose(token_margin[..., kept], teacher.token_margins[kept].expand(2, 5, -1), atol=1e-3)
    # An emulator identical to the LLM is off by about H in log-mass outside A.
    divergence, mass_error = teacher.loss(reference, reference, weights)
    assert divergence.item() > 0.01 and mass_error.item() > 4.0**2 / 2


def test_elevation_by_the_teacher_drives_the_measured_margin_toward_h(texts):
    wider = tiny_model(num_layers=6, hidden_size=64)
    llm = wider.model
    with torch.no_grad():  # sharper logits, so the middle layers can move mass between tokens
        llm.model.norm.weight.mul_(8.0)
    pair = emulator_pair(llm, keep_every=2)
    margin = 1.0
    config = ElevationConfig(
        margin=margin, steps=60, batch_size=4, max_length=16, learning_rate=1e-2, margin_weight=0.0, teacher_weight=1.0
    )
    before = perplexities(llm, pair.emulator, wider.tokenizer, texts.heldout[:40], max_length=16)
    history = elevate_emulator(pair, wider.tokenizer, texts.train[:400], config, progress=False)
    after = perplexities(llm, pair.emulator, wider.tokenizer, texts.heldout[:40], max_length=16)
    assert abs(math.log(before["ppl_ratio"]) - margin) > 0.8
    assert abs(math.log(after["ppl_ratio"]) - margin) < 0.3
    assert history[-1]["teacher_mass_error"] < 0.01 * history[0]["teacher_mass_error"]


def test_the_simulated_client_descends_its_loss_in_both_models_and_restores_them(texts):
    wider = tiny_model(num_layers=6, hidden_size=64)
    llm, reference = wider.model, copy.deepcopy(wider.model)
    pair = emulator_pair(llm, keep_every=2)
    ids, mask = TextBatches(wider.tokenizer, texts.train[:1], 16, seed=0).next(4)  # one text, four times
    client = SimulatedClient(pair, steps=20, learning_rate=1e-2)
    losses = [client.step(ids, mask) for _ in range(10)]
    assert losses[-1] < losses[0] - 0.5
    emulated = pair.emulator.model.layers[0].mlp.up_proj.weight
    assert torch.equal(emulated, llm.model.layers[0].mlp.up_proj.weight)  # one update, shared
    assert not torch.equal(emulated, reference.model.layers[0].mlp.up_proj.weight)
    client.park()  # the LLM's weights for a while, then the next step continues from the update
    assert torch.equal(emulated, reference.model.layers[0].mlp.up_proj.weight)
    assert client.step(ids, mask) < losses[0] - 0.5
    client.restore()
    for a, b in zip(llm.parameters(), reference.parameters(), strict=True):
        assert torch.equal(a, b)


def test_a_simulated_client_trains_only_the_layers_it_is_given(texts):
    wider = tiny_model(num_layers=6, hidden_size=64)
    llm, reference = wider.model, copy.deepcopy(wider.model)
    pair = emulator_pair(llm, keep_every=2)
    ids, mask = TextBatches(wider.tokenizer, texts.train[:1], 16, seed=0).next(4)
    client = SimulatedClient(pair, steps=20, learning_rate=1e-2, layers=pair.plan.bottom)
    client.step(ids, mask)
    (bottom,), (top,) = pair.plan.bottom, pair.plan.top
    moved = [
        not torch.equal(llm.model.layers[i].mlp.up_proj.weight, reference.model.layers[i].mlp.up_proj.weight)
        for i in (bottom, top)
    ]
    assert moved == [True, False]


def test_a_lora_shaped_simulated_client_moves_weight_matrices_by_low_rank_updates_only(texts):
    wider = tiny_model(num_layers=6, hidden_size=64)
    llm, reference = wider.model, copy.deepcopy(wider.model)
    pair = emulator_pair(llm, keep_every=2)
    ids, mask = TextBatches(wider.tokenizer, texts.train[:1], 16, seed=0).next(4)
    client = SimulatedClient(pair, steps=20, learning_rate=1e-2, lora=LowRankUpdate(rank=2, alpha=4.0))
    losses = [client.step(ids, mask) for _ in range(10)]
    assert losses[-1] < losses[0] - 0.5
    layer, original = llm.model.layers[0], reference.model.layers[0]
    delta = layer.mlp.up_proj.weight - original.mlp.up_proj.weight
    assert 0 < torch.linalg.matrix_rank(delta) <= 2
    assert torch.equal(pair.emulator.model.layers[0].mlp.up_proj.weight, layer.mlp.up_proj.weight)
    assert torch.equal(layer.input_layernorm.weight, original.input_layernorm.weight)  # norms: not LoRA's
    client.restore()
    for a, b in zip(llm.parameters(), reference.parameters(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("client_lora_rank", [0, 2])
def test_elevation_under_a_simulated_client_leaves_the_llm_untouched(texts, client_lora_rank):
    wider = tiny_model(num_layers=6, hidden_size=64)
    llm, reference = wider.model, copy.deepcopy(wider.model)
    pair = emulator_pair(llm, keep_every=2)
    shape = {"margin": 0.3, "steps": 6, "batch_size": 4, "max_length": 16}
    config = ElevationConfig(**shape, client_steps=3, client_every=2, client_lora_rank=client_lora_rank)
    history = elevate_emulator(pair, wider.tokenizer, texts.train[:400], config, progress=False)
    assert all(math.isfinite(h["client_loss"]) for h in history)
    for a, b in zip(llm.parameters(), reference.parameters(), strict=True):
        assert torch.equal(a, b)
    for source in pair.plan.adapter_layers:  # the emulator's adapter layers are the LLM's again
        emulated = pair.emulator.model.layers[pair.plan.emulator_position_of[source]]
        assert torch.equal(emulated.mlp.up_proj.weight, llm.model.layers[source].mlp.up_proj.weight)


def test_prepared_emulators_are_cached(tiny, texts, tmp_path, monkeypatch):
    monkeypatch.setenv("BLINDTUNE_CACHE", str(tmp_path))
    llm = copy.deepcopy(tiny.model)
    plan = plan_layers(6, 1, 2)
    distill = DistillConfig(steps=3, batch_size=4, max_length=16, learning_rate=1e-2)
    elevation = ElevationConfig(steps=3, batch_size=4, max_length=16, learning_rate=1e-2)
    kwargs = {"distill": distill, "then": Elevation(elevation), "seed": 0, "progress": False}
    first = prepare_emulator(llm, build_emulator(llm, plan), plan, tiny.tokenizer, texts.train[:50], **kwargs)
    again = prepare_emulator(llm, build_emulator(llm, plan), plan, tiny.tokenizer, texts.train[:50], **kwargs)
    assert not first.from_cache and again.from_cache
    assert set(first.history) == {"distill", "elevate"} and again.history == first.history
    for a, b in zip(first.model.parameters(), again.model.parameters(), strict=True):
        assert torch.equal(a, b)
    assert len(list((tmp_path / "emulators").glob("*.safetensors"))) == 2  # distilled and elevated stages
