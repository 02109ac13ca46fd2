"""Built-in backbones (registered in pyproject.toml under metarec.backbones)."""
