"""Built-in algorithms (registered in pyproject.toml under metarec.algorithms)."""
