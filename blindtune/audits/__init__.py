"""Run-level privacy audits (see docs/privacy.md): what a finished run's protections spent and what
attacks on its outputs find, written to results.json's `privacy` section.

- `ledger_check`: did any client's raw text reach the server (read from the server's traffic);
- `mia`: membership inference on the adapted LLM;
- `audit`: the `privacy` section of results.json, and the membership-inference and misuse audits;
- `report`: the privacy/utility table of report.md.
"""
