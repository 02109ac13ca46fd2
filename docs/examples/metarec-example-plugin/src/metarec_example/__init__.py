"""Example metarec plugins: L2-MAML (``example-l2maml``) and proximal fine-tuning
(``example-proximal-finetune``). They are registered as entry points in ``pyproject.toml``;
nothing here registers anything at import time."""

from metarec_example.l2maml import L2MAML
from metarec_example.proximal import squared_distance, support_loss, with_proximal
from metarec_example.proximal_finetune import ProximalFineTune

__version__ = "0.1.0"

__all__ = ["L2MAML", "ProximalFineTune", "squared_distance", "support_loss", "with_proximal"]
