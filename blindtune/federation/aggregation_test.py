import math

import pytest
import torch

from blindtune.federation.aggregation import ClientUpdate, fedavg, screen, update_norm


def _state(value: float) -> dict[str, torch.Tensor]:
    return {"layers.0.w": torch.full((2, 2), value), "layers.0.b": torch.tensor([value, -value])}


def test_fedavg_weights_by_examples():
    result = fedavg([ClientUpdate(1, _state(1.0), 10), ClientUpdate(2, _state(4.0), 30)])
    assert torch.allclose(result["layers.0.w"], torch.full((2, 2), (1.0 * 10 + 4.0 * 30) / 40))
    assert torch.allclose(result["layers.0.b"], torch.tensor([3.25, -3.25]))
    assert result["layers.0.w"].dtype == torch.float32


def test_fedavg_of_one_is_identity_and_of_none_is_an_error():
    state = _state(2.5)
    assert all(torch.equal(fedavg([ClientUpdate(1, state, 3)])[k], v) for k, v in state.items())
    with pytest.raises(ValueError):
        fedavg([])


def test_screen_rejects_nan_wrong_shape_and_absurd_norms():
    base = _state(0.0)
    updates = [ClientUpdate(i, _state(0.1 * i), 5) for i in range(1, 5)]
    updates.append(ClientUpdate(9, _state(1000.0), 5))
    updates.append(ClientUpdate(10, {**_state(0.1), "layers.0.w": torch.full((2, 2), math.nan)}, 5))
    updates.append(ClientUpdate(11, {"layers.0.w": torch.zeros(3)}, 5))
    updates.append(ClientUpdate(12, _state(0.1), 0))
    kept, rejected = screen(updates, base, max_norm_ratio=10.0)
    assert [u.node_id for u in kept] == [1, 2, 3, 4]
    reasons = {r.node_id: r.reason for r in rejected}
    assert set(reasons) == {9, 10, 11, 12}
    assert "norm" in reasons[9] and "NaN" in reasons[10] and "missing" in reasons[11]


def test_update_norm():
    assert update_norm(_state(1.0), _state(0.0)) == pytest.approx(math.sqrt(4 + 2))
