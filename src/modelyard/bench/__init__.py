"""`modelyard bench`: modelyard and llama-server router mode side by side, on the same binary and models.

This package's top level holds only the scenario names, so that `modelyard --help` and `modelyard serve` can
declare the bench command without importing the harness (matplotlib, httpx): `__main__` imports it when run."""

# What `--only` can name, in the order a whole run measures them.
SCENARIOS = ("hot-path", "swaps", "busy", "resident", "resident-default", "scale", "fresh-swap", "soak")
# Run only when named (`--only cluster`): it needs the `ray` extra, and writes its own report (<out>/cluster/).
CLUSTER = "cluster"
