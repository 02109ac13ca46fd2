"""Built-in datasets (registered in pyproject.toml under metarec.datasets)."""
