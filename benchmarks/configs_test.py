"""The research configs: each one loads as the product config it changes, and names its command."""

from pathlib import Path

import pytest
import yaml

from blindtune.config import BASE_KEY, packaged_config
from blindtune.methods import load_run_config

CONFIG_DIR = Path(__file__).resolve().parent / "configs"


@pytest.mark.parametrize("path", sorted(CONFIG_DIR.glob("*.yaml")), ids=lambda p: p.name)
def test_research_config_is_an_override_of_a_product_and_names_its_command(path: Path) -> None:
    base = yaml.safe_load(path.read_text())[BASE_KEY]
    chain = [path.name]
    while (CONFIG_DIR / base).is_file():  # a research config may change another one
        chain.append(base)
        base = yaml.safe_load((CONFIG_DIR / base).read_text())[BASE_KEY]
    assert packaged_config(base).is_file(), f"{' <- '.join(chain)} does not end at a product config: {base}"
    load_run_config(path)  # typed, unknown keys rejected
    header = [line for line in path.read_text().splitlines() if line.startswith("#")]
    assert any(f"benchmarks/configs/{path.name}" in line for line in header) or any(
        "python -m benchmarks." in line for line in header
    ), f"{path.name}: no command in its header"
