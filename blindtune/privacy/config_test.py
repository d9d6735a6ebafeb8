import pytest

from blindtune.config import ConfigError
from blindtune.methods import run_config_from_dict
from blindtune.privacy import AccountantKind, ClippingKind, PrivacyConfig


def test_privacy_is_off_by_default_and_parses_from_yaml_data():
    assert not PrivacyConfig().dp.enabled and not PrivacyConfig().secagg.enabled
    config = run_config_from_dict(
        {
            "method": "offsite",
            "privacy": {
                "dp": {"enabled": True, "target_epsilon": 8, "accountant": "prv"},
                "server_dp": {"clipping": "adaptive"},
                "audit": {"membership_inference": True, "limit_client_examples": 32},
            },
        }
    )
    assert config.privacy.dp.target_epsilon == 8.0 and config.privacy.dp.accountant is AccountantKind.PRV
    assert config.privacy.server_dp.clipping is ClippingKind.ADAPTIVE
    assert config.privacy.audit.limit_client_examples == 32
    assert config.to_dict()["privacy"]["dp"]["accountant"] == "prv"


@pytest.mark.parametrize(
    "section",
    [
        {"dp": {"enabled": True}},  # neither noise nor target
        {"dp": {"enabled": True, "noise_multiplier": 1.0, "target_epsilon": 8.0}},  # both
        {"dp": {"delta": 1.5}},
        {"secagg": {"enabled": True}, "server_dp": {"enabled": True}},  # server DP cannot clip masked updates
        {"dp": {"epsilon": 8}},  # unknown key
    ],
)
def test_invalid_privacy_settings_are_rejected_with_their_path(section):
    with pytest.raises(ConfigError, match="privacy"):
        run_config_from_dict({"method": "offsite", "privacy": section})
