import dataclasses
import re

import pytest
import yaml

from blindtune import config as config_module
from blindtune.config import ConfigError, packaged_config, parse_settings
from blindtune.federation.strategies import StrategyName
from blindtune.methods import UnknownMethodError, load_run_config, run_config_from_dict
from blindtune.models.adapters import AdapterKind


def _write(tmp_path, data):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_packaged_configs_load():
    from blindtune.cli import DEMO_CONFIG, DEMO_QUICK_CONFIG

    for name in (DEMO_CONFIG, DEMO_QUICK_CONFIG):
        config = load_run_config(packaged_config(name))
        assert config.method == "offsite" and config.federation.num_clients == 3


def test_every_packaged_config_loads_and_names_its_command():
    directory = packaged_config("offsite_wordnet_3clients.yaml").parent
    paths = sorted(directory.glob("*.yaml"))
    assert 7 <= len(paths) <= 15  # the products; research configs live beside their results in benchmarks/configs/
    assert {load_run_config(path).method for path in paths} >= {"offsite", "lleot", "fedproxy", "fedcot", "fedmkt"}
    for path in paths:
        load_run_config(path)  # typed, unknown keys rejected
        header = [line for line in path.read_text().splitlines() if line.startswith("#")]
        assert any(path.name in line for line in header), f"{path.name}: no run command in its header"


def test_sections_become_typed_objects_and_round_trip():
    config = run_config_from_dict(
        {
            "method": "offsite",
            "federation": {"strategy": "flora", "client_lora_ranks": [2, 8]},
            "train": {"learning_rate": 1},
            "offsite": {"adapter": {"kind": "layers"}},
        }
    )
    assert config.federation.strategy is StrategyName.FLORA
    assert config.train.learning_rate == 1.0 and isinstance(config.train.learning_rate, float)
    assert config.method_config.adapter.kind is AdapterKind.LAYERS
    assert config.federation.client_rank(3) == 8
    assert run_config_from_dict(config.to_dict()).to_dict() == config.to_dict()


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"method": "offsite", "federaton": {}}, "unknown key(s) federaton"),
        ({"method": "offsite", "train": {"stepz": 3}}, "unknown key(s) train.stepz"),
        ({"method": "offsite", "offsite": {"adapter": {"rank": 3}}}, "unknown key(s) offsite.adapter.rank"),
        ({"method": "offsite", "train": {"steps": "many"}}, "train.steps: expected int"),
        ({"method": "offsite", "federation": {"engine": "warp"}}, "federation.engine: 'warp' is not one of"),
        # A deployment is `blindtune launch`'s, which `blindtune run` cannot serve: not an engine value.
        (
            {"method": "offsite", "federation": {"engine": "deployment"}},
            "federation.engine: 'deployment' is not one of simulation, inprocess",
        ),
        ({"method": "offsite", "federation": {"num_clients": 0}}, "num_clients"),
        ({"method": "offsite", "federation": {"client_lora_ranks": [2, 4]}}, "needs strategy: flora"),
        ({"method": "offsite", "seed": None}, "seed: expected int, got None"),
        ({"method": "offsite", "eval": {"split": "train"}}, "eval.split must be 'test' or 'validation'"),
        ({"method": "offsite", "federation": {"server_learning_rate": -1}}, "server_learning_rate must be > 0"),
    ],
)
def test_bad_configs_name_the_offending_key(data, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        run_config_from_dict(data)


def test_unknown_method_and_bad_yaml(tmp_path):
    with pytest.raises(UnknownMethodError, match=r"available: .*offsite"):
        run_config_from_dict({"method": "telepathy"})
    bad = tmp_path / "bad.yaml"
    bad.write_text("method: [offsite\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_run_config(bad)
    with pytest.raises(ConfigError, match="cannot read"):
        load_run_config(tmp_path / "missing.yaml")


def test_overrides_merge_into_the_file(tmp_path):
    path = _write(tmp_path, {"method": "offsite", "federation": {"rounds": 5, "num_clients": 4}})
    config = load_run_config(path, {"federation": {"engine": "inprocess"}})
    assert config.federation.rounds == 5 and config.federation.engine.value == "inprocess"


def test_settings_override_any_field_with_yaml_values():
    quick = packaged_config("offsite_wordnet_3clients_quick.yaml")
    settings = ["train.steps=40", "federation.rounds=6", "train.learning_rate=0.01", "offsite.adapter.lora_rank=4"]
    config = load_run_config(quick, settings=[*settings, "federation.client_batch_sizes=[4, 8]", "eval.limit=null"])
    assert (config.train.steps, config.federation.rounds, config.train.learning_rate) == (40, 6, 0.01)
    assert config.method_config.adapter.lora_rank == 4 and config.federation.client_batch_sizes == [4, 8]
    assert config.eval.limit is None
    untouched = load_run_config(quick)
    assert untouched.train.steps == 20 and untouched.train.batch_size == config.train.batch_size == 8


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("train.stepz=40", "unknown key(s) train.stepz"),
        ("offsite.adapter.rnak=4", "unknown key(s) offsite.adapter.rnak"),
        ("train.steps=many", "train.steps: expected int, got 'many'"),
        ("federation.rounds=[6]", "federation.rounds: expected int"),
        ("federation.engine=warp", "federation.engine: 'warp' is not one of"),
        ("train.steps.max=3", "train.steps: expected int"),
        ("train.steps", "expected KEY.PATH=VALUE"),
        ("train..steps=3", "expected KEY.PATH=VALUE"),
    ],
)
def test_bad_settings_are_rejected_naming_the_key(setting, message):
    quick = packaged_config("offsite_wordnet_3clients_quick.yaml")
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_run_config(quick, settings=[setting])


def test_parse_settings_nests_dotted_keys():
    assert parse_settings(["a.b=1", "a.c=x", "d=[1, 2]"]) == {"a": {"b": 1, "c": "x"}, "d": [1, 2]}
    with pytest.raises(ConfigError, match="a is already set"):
        parse_settings(["a=1", "a.b=2"])


def test_a_config_with_a_base_is_its_base_with_its_keys_merged_over_it(tmp_path):
    (tmp_path / "variant.yaml").write_text("base: offsite_wordnet_3clients_quick.yaml\ntrain: {steps: 5}\n")
    (tmp_path / "variant2.yaml").write_text("base: variant.yaml\noffsite: {adapter: {lora_rank: 2}}\n")
    config = load_run_config(tmp_path / "variant2.yaml")  # a chain: a file beside it, then a packaged config
    product = load_run_config(packaged_config("offsite_wordnet_3clients_quick.yaml"))
    assert config.train.steps == 5 and config.method_config.adapter.lora_rank == 2
    assert config.train.learning_rate == product.train.learning_rate and config.federation == product.federation
    (tmp_path / "loop.yaml").write_text("base: loop.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_run_config(tmp_path / "loop.yaml")
    (tmp_path / "nobase.yaml").write_text("base: no_such.yaml\n")
    with pytest.raises(ConfigError, match=r"cannot read .*no_such\.yaml"):
        load_run_config(tmp_path / "nobase.yaml")


def test_the_method_section_is_typed_by_the_class_the_caller_names():
    @dataclasses.dataclass
    class Section:
        depth: int = 1

    data = {"method": "toy", "toy": {"depth": 3}}
    assert config_module.run_config_from_dict(data, lambda name: Section).method_config == Section(depth=3)
    with pytest.raises(ConfigError, match=re.escape("unknown key(s) toy.width")):
        config_module.run_config_from_dict({"method": "toy", "toy": {"width": 3}}, lambda name: Section)


def test_variants_can_be_scored_on_the_validation_split():
    from blindtune.config import EvalConfig
    from blindtune.data import load_task

    task = load_task("wordnet-supersense")
    assert EvalConfig().evaluator(task, progress=False).task.test == task.test
    assert EvalConfig(split="validation").evaluator(task, progress=False).task.test == task.validation
