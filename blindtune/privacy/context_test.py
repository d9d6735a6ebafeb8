import math
from pathlib import Path

import pytest

from blindtune.privacy.config import DPSGDConfig, PrivacyConfig, SecAggConfig
from blindtune.privacy.context import (
    PrivacyNotAppliedError,
    ServerPrivacy,
    active_client_privacy,
    client_privacy,
    require_client_dp,
    server_privacy,
)

DP = PrivacyConfig(dp=DPSGDConfig(enabled=True, noise_multiplier=1.0))


def reply(**metrics):
    return {"num_examples": 10, **metrics}


def test_a_server_protection_that_no_round_loop_applied_is_an_error():
    with pytest.raises(PrivacyNotAppliedError), server_privacy(PrivacyConfig(secagg=SecAggConfig(enabled=True))):
        pass
    with server_privacy(PrivacyConfig(secagg=SecAggConfig(enabled=True))) as policy:
        policy.applied = True
    with server_privacy(PrivacyConfig()):  # nothing server-side asked for: nothing to apply
        pass


def test_the_client_policy_is_scoped_to_the_message():
    assert active_client_privacy() is None
    with client_privacy(DP, workdir=Path("."), planned_rounds=3) as policy:
        assert active_client_privacy() is policy and policy.planned_rounds == 3
    assert active_client_privacy() is None


def test_client_dp_replies_must_carry_their_epsilon():
    policy = ServerPrivacy(DP)
    assert require_client_dp(policy, {1: reply(dp_epsilon=2.0), 2: reply(dp_epsilon=3.0)}, 1) == 3.0
    assert require_client_dp(policy, {1: reply(dp_epsilon=-1.0)}, 1) == math.inf  # no noise
    with pytest.raises(PrivacyNotAppliedError, match="client 2"):
        require_client_dp(policy, {1: reply(dp_epsilon=2.0), 2: reply()}, 1)
    with pytest.raises(PrivacyNotAppliedError, match="client 3"):
        require_client_dp(policy, {3: None}, 1)
    assert require_client_dp(ServerPrivacy(PrivacyConfig()), {2: reply()}, 1) is None
    assert require_client_dp(None, {2: reply()}, 1) is None
