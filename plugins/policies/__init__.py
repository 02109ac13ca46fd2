"""Built-in policies (registered in pyproject.toml under metarec.policies)."""
