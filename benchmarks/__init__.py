"""blindtune's benchmark suite: utility table, training throughput, scale and communication.

    python -m benchmarks.suite [--quick] [--out DIR]

See benchmarks/README.md for what each part measures and the budgets.
"""
