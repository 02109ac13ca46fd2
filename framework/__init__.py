"""metarec: meta-learning and fast adaptation for recommender systems, on PyTorch Lightning.

The public API that plugins (built-in and third-party) build on is exported here.
"""

from metarec.algorithm import MetaAlgorithm
from metarec.backbone import Backbone
from metarec.data import (
                          DataError,
                          EpisodeBatch,
                          Feature,
                          FeatureBatch,
                          InteractionTable,
                          TaskConfig,
                          build_tasks,
                          encode_ids,
                          inputs,
                          numeric_column,
                          read_frame,
                          require_columns,
)
from metarec.dataset import Dataset
from metarec.functional import FunctionalModel, Params, masked_loss, sgd_update
from metarec.metrics import MetricsConfig
from metarec.policy import AdaptationPolicy
from metarec.registry import PluginError, available, build, reset_registry, resolve
from metarec.schema import DataSchema, FeatureSpec

__version__ = "0.1.0"

__all__ = [
    "AdaptationPolicy", "Backbone", "DataError", "DataSchema", "Dataset", "EpisodeBatch",
    "Feature", "FeatureBatch", "FeatureSpec", "FunctionalModel", "InteractionTable",
    "MetaAlgorithm", "MetricsConfig", "Params", "PluginError", "TaskConfig", "available",
    "build", "build_tasks", "encode_ids", "inputs", "masked_loss", "numeric_column",
    "read_frame", "require_columns", "reset_registry", "resolve", "sgd_update",
]
