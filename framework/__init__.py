"""metarec: meta-learning and fast adaptation for recommender systems, on PyTorch Lightning.

The public API that plugins (built-in and third-party) build on is exported here.
"""

from metarec.adapter import Adapter, Recommendations, UserSession
from metarec.algorithm import MetaAlgorithm
from metarec.backbone import Backbone
from metarec.checkpoint import (
    building_for_inference,
    for_inference,
    load_backbone,
    load_checkpoint,
    train_recipe,
)
from metarec.data import (
    ENCODED,
    ConfigError,
    DataError,
    EpisodeBatch,
    EpisodeCollator,
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
from metarec.functional import (
    SGD,
    Adam,
    FunctionalModel,
    InnerOptimizer,
    Objective,
    Params,
    masked_loss,
    select_parameters,
)
from metarec.metrics import MetricsConfig
from metarec.policy import AdaptationPolicy
from metarec.ranges import (
    ClosedUnitInterval,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    UnitFraction,
)
from metarec.registry import PluginError, available, build, reset_registry, resolve
from metarec.schema import DataSchema, FeatureSpec
from metarec.tracking import log_curve, log_table

__version__ = "0.1.0"

__all__ = [
    "ENCODED", "ConfigError", "SGD", "AdaptationPolicy", "Adam", "Adapter", "Recommendations", "UserSession", "Backbone", "DataError", "DataSchema", "Dataset",
    "EpisodeBatch", "EpisodeCollator", "Feature", "FeatureBatch", "FeatureSpec",
    "FunctionalModel", "InnerOptimizer", "InteractionTable", "MetaAlgorithm", "MetricsConfig",
    "Objective", "Params", "PluginError", "TaskConfig", "available", "build", "build_tasks",
    "encode_ids", "inputs", "masked_loss", "numeric_column", "read_frame", "require_columns",
    "reset_registry", "resolve", "select_parameters", "load_backbone", "load_checkpoint",
    "train_recipe", "building_for_inference", "for_inference", "log_curve", "log_table",
    # range types for plugin signatures, checked when a recipe is parsed (metarec.ranges)
    "ClosedUnitInterval", "NonNegativeFloat", "NonNegativeInt", "PositiveFloat", "PositiveInt",
    "UnitFraction",
]
