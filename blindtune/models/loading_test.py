"""Cache files appear whole or not at all."""

from __future__ import annotations

from pathlib import Path

import pytest

from blindtune.models.loading import written_atomically


def test_written_atomically_moves_a_finished_file_and_drops_a_failed_one(tmp_path: Path) -> None:
    target = tmp_path / "cache" / "x.json"
    with written_atomically(target) as temporary:
        assert temporary.parent == target.parent and temporary.suffix == ".json" and temporary != target
        temporary.write_text("done")
    assert target.read_text() == "done"

    with pytest.raises(RuntimeError), written_atomically(tmp_path / "cache" / "y.json") as temporary:
        temporary.write_text("half")
        raise RuntimeError("interrupted")
    assert sorted(p.name for p in target.parent.iterdir()) == ["x.json"]
