"""Federation on Flower: engines, messaging, the communication ledger and aggregation."""
