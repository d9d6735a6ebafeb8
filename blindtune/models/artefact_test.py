"""A stored artefact loads as a model of its own; a process keeps the built model per content hash."""

import torch

from blindtune.models import artefact as artefact_module
from blindtune.models.artefact import describe, load_artefact, save_artefact, unique_state_dict
from blindtune.models.loading import tiny_model


def store(directory, seed: int):
    loaded = tiny_model(num_layers=2, hidden_size=32, seed=seed)
    save_artefact(directory, describe(loaded), unique_state_dict(loaded.model))
    return loaded


def weights(model) -> dict[str, torch.Tensor]:
    return {name: tensor.clone() for name, tensor in model.state_dict().items()}


def test_a_loaded_artefact_is_a_copy_the_caller_may_train(tmp_path):
    original = store(tmp_path, seed=0)
    first = load_artefact(tmp_path)
    with torch.no_grad():
        for parameter in first.model.parameters():
            parameter.add_(1.0)  # training in place, as a client round does
    second = load_artefact(tmp_path)
    expected = weights(original.model)
    assert all(torch.equal(second.model.state_dict()[name], expected[name]) for name in expected)
    assert second.model is not first.model


def test_a_new_hand_out_in_the_same_directory_is_never_the_old_one(tmp_path):
    store(tmp_path, seed=0)
    old = weights(load_artefact(tmp_path).model)
    new_source = store(tmp_path, seed=1)
    new = weights(load_artefact(tmp_path).model)
    expected = weights(new_source.model)
    assert all(torch.equal(new[name], expected[name]) for name in expected)
    assert any(not torch.equal(new[name], old[name]) for name in old)


def test_a_fresh_process_rebuilds_from_the_work_directory(tmp_path, monkeypatch):
    source = store(tmp_path, seed=0)
    load_artefact(tmp_path)
    monkeypatch.setattr(artefact_module, "_built", {})  # a restarted client: nothing in memory
    rebuilt = load_artefact(tmp_path)
    expected = weights(source.model)
    assert all(torch.equal(rebuilt.model.state_dict()[name], expected[name]) for name in expected)
    assert len(artefact_module._built) == 1
