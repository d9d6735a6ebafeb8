import itertools
import math

import pytest

from blindtune.privacy.accountant import (
    ACCOUNTANT_FILE,
    AccountantState,
    epsilon,
    load_accountant,
    noise_for_budget,
    reset_accountant,
    save_accountant,
)
from blindtune.privacy.config import AccountantKind

DELTA = 1 / 2000
RATE = 8 / 2000


@pytest.mark.parametrize("kind", list(AccountantKind))
def test_epsilon_grows_with_rounds_and_shrinks_with_noise(kind):
    steps_per_round = 20
    by_rounds = [epsilon(kind, [(0.8, RATE, steps_per_round * r)], DELTA) for r in (1, 2, 4, 8)]
    assert all(a < b for a, b in itertools.pairwise(by_rounds)), by_rounds
    by_noise = [epsilon(kind, [(noise, RATE, 40)], DELTA) for noise in (0.5, 0.8, 1.2, 2.0)]
    assert all(a > b for a, b in itertools.pairwise(by_noise)), by_noise
    assert epsilon(kind, [], DELTA) == 0.0
    assert epsilon(kind, [(0.0, RATE, 5)], DELTA) == math.inf


def test_composition_of_round_entries_equals_one_long_entry():
    per_round = [(0.8, RATE, 20), (0.8, RATE, 20), (0.8, RATE, 20)]
    assert epsilon(AccountantKind.RDP, per_round, DELTA) == pytest.approx(
        epsilon(AccountantKind.RDP, [(0.8, RATE, 60)], DELTA), rel=1e-9
    )


def test_noise_for_budget_meets_the_target_over_all_planned_steps():
    noise = noise_for_budget(AccountantKind.RDP, 8.0, DELTA, RATE, steps=40)
    assert epsilon(AccountantKind.RDP, [(noise, RATE, 40)], DELTA) <= 8.0
    assert epsilon(AccountantKind.RDP, [(noise * 0.9, RATE, 40)], DELTA) > 8.0 * 0.95


def test_state_is_kept_in_the_workdir_and_reset_for_a_new_run(tmp_path):
    state = load_accountant(tmp_path, AccountantKind.RDP, DELTA)
    assert state.steps == 0 and state.epsilon() == 0.0
    state.history = [(1.0, RATE, 20)]
    state.rounds = [1]
    save_accountant(tmp_path, state)
    again = load_accountant(tmp_path, AccountantKind.RDP, DELTA)
    assert again == AccountantState(AccountantKind.RDP, DELTA, [(1.0, RATE, 20)], [1])
    with pytest.raises(ValueError, match="delta"):
        load_accountant(tmp_path, AccountantKind.RDP, DELTA / 2)
    reset_accountant(tmp_path)
    assert not (tmp_path / ACCOUNTANT_FILE).exists()
