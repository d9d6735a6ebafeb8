"""Privacy protections (see docs/privacy.md); the audits of a finished run are `blindtune.audits`.

- `config`: the run config's `privacy` section;
- `dp`: DP-SGD for client adapters with Opacus; `accountant`: epsilon composed across rounds;
- `server_dp`: client-level DP on the server with Flower's DP strategy wrappers;
- `secagg`: secure aggregation with Flower's SecAgg+ workflow and mod;
- `context`: each party's policy while it handles a message.

Only the configuration is imported here; the rest loads Opacus or Flower's workflows on use.
"""

from blindtune.privacy.config import (
    AccountantKind,
    AuditConfig,
    ClippingKind,
    DPSGDConfig,
    PrivacyConfig,
    SecAggConfig,
    ServerDPConfig,
)

__all__ = [
    "AccountantKind",
    "AuditConfig",
    "ClippingKind",
    "DPSGDConfig",
    "PrivacyConfig",
    "SecAggConfig",
    "ServerDPConfig",
]
