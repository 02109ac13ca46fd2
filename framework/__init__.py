"""metarec: meta-learning and fast adaptation for recommender systems, on PyTorch Lightning.

The public API that plugins (built-in and third-party) build on is exported here. The names
are imported on first use (PEP 562): ``import metarec`` alone loads neither torch nor
Lightning, so ``metarec --help`` and ``metarec plugins`` answer at once.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# name -> the module that defines it
_EXPORTS: dict[str, str] = {
    **dict.fromkeys(["Adapter", "ItemSession", "RankedUsers", "Recommendations", "Session",
                     "UserSession"], "metarec.adapter"),
    "MetaAlgorithm": "metarec.algorithm",
    "Backbone": "metarec.backbone",
    **dict.fromkeys(["building_for_inference", "for_inference", "load_backbone",
                     "load_checkpoint", "train_recipe"], "metarec.checkpoint"),
    **dict.fromkeys(["ENCODED", "ConfigError", "DataError", "EpisodeBatch", "EpisodeCollator",
                     "Feature", "FeatureBatch", "InteractionTable", "TaskConfig", "build_tasks",
                     "encode_ids", "inputs", "numeric_column", "read_frame", "require_columns",
                     "FilterReport", "id_column", "require_rows"],
                    "metarec.data"),
    "Dataset": "metarec.dataset",
    **dict.fromkeys(["SGD", "Adam", "FunctionalModel", "InnerOptimizer", "Objective", "Params",
                     "masked_loss", "select_parameters", "vmap_tasks"], "metarec.functional"),
    "MetricsConfig": "metarec.metrics",
    "AdaptationPolicy": "metarec.policy",
    **dict.fromkeys(["ClosedUnitInterval", "NonNegativeFloat", "NonNegativeInt", "PositiveFloat",
                     "PositiveInt", "UnitFraction"], "metarec.ranges"),
    **dict.fromkeys(["PluginError", "available", "build", "reset_registry", "resolve"],
                    "metarec.registry"),
    **dict.fromkeys(["DataSchema", "FeatureSpec"], "metarec.schema"),
    **dict.fromkeys(["log_curve", "log_table"], "metarec.tracking"),
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:  # AttributeError lets `from metarec import <submodule>` import it
        raise AttributeError(f"module 'metarec' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})


if TYPE_CHECKING:  # for type checkers and IDEs: the same names, imported eagerly
    from metarec.adapter import (  # noqa: F401
        Adapter,
        ItemSession,
        RankedUsers,
        Recommendations,
        Session,
        UserSession,
    )
    from metarec.algorithm import MetaAlgorithm  # noqa: F401
    from metarec.backbone import Backbone  # noqa: F401
    from metarec.checkpoint import (  # noqa: F401
        building_for_inference,
        for_inference,
        load_backbone,
        load_checkpoint,
        train_recipe,
    )
    from metarec.data import (  # noqa: F401
        ENCODED,
        ConfigError,
        DataError,
        EpisodeBatch,
        EpisodeCollator,
        Feature,
        FeatureBatch,
        FilterReport,
        InteractionTable,
        TaskConfig,
        build_tasks,
        encode_ids,
        id_column,
        inputs,
        numeric_column,
        read_frame,
        require_columns,
        require_rows,
    )
    from metarec.dataset import Dataset  # noqa: F401
    from metarec.functional import (  # noqa: F401
        SGD,
        Adam,
        FunctionalModel,
        InnerOptimizer,
        Objective,
        Params,
        masked_loss,
        select_parameters,
        vmap_tasks,
    )
    from metarec.metrics import MetricsConfig  # noqa: F401
    from metarec.policy import AdaptationPolicy  # noqa: F401
    from metarec.ranges import (  # noqa: F401
        ClosedUnitInterval,
        NonNegativeFloat,
        NonNegativeInt,
        PositiveFloat,
        PositiveInt,
        UnitFraction,
    )
    from metarec.registry import PluginError, available, build, reset_registry, resolve  # noqa: F401
    from metarec.schema import DataSchema, FeatureSpec  # noqa: F401
    from metarec.tracking import log_curve, log_table  # noqa: F401
