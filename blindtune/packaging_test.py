"""The built wheel carries the product configs, and an installed blindtune finds its demo config in itself."""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
@pytest.mark.ci
def test_wheel_ships_the_product_configs_and_the_installed_demo_reads_them(tmp_path: Path) -> None:
    source = tmp_path / "source"  # a clean copy: no stale build/ of the working tree ends up in the wheel
    shutil.copytree(ROOT / "blindtune", source / "blindtune", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", str(source), "--no-deps", "--no-build-isolation", "-w", str(tmp_path)], check=True)
    (wheel,) = tmp_path.glob("blindtune-*.whl")
    shipped = {Path(n).name for n in zipfile.ZipFile(wheel).namelist() if n.startswith("blindtune/configs/")}
    products = {path.name for path in (ROOT / "blindtune" / "configs").glob("*.yaml")}
    assert shipped == products and "offsite_wordnet_3clients_quick.yaml" in shipped

    site = tmp_path / "site"
    subprocess.run([*pip, "install", "--no-deps", "--target", str(site), str(wheel)], check=True)
    elsewhere = tmp_path / "elsewhere"  # neither the source tree nor the working tree is importable from here
    elsewhere.mkdir()
    # A misspelt --set stops the demo at its config, before any model loads: the error names the file it read.
    done = subprocess.run(
        [sys.executable, "-m", "blindtune.cli", "demo", "--quick", "--set", "train.stepz=1"],
        cwd=elsewhere,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(site), "HOME": str(tmp_path)},
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2, done.stdout + done.stderr
    assert f"{site}/blindtune/configs/offsite_wordnet_3clients_quick.yaml" in done.stdout.replace("\n", "")
    assert "unknown key(s) train.stepz" in done.stdout
