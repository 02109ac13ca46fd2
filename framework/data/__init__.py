"""Data: interaction tables, validated readers, task building and episode batches."""

from metarec.data.episodes import (
    ENCODED,
    EpisodeBatch,
    EpisodeCollator,
    FeatureBatch,
    SupportSweepCollator,
    inputs,
    support_label,
)
from metarec.data.errors import ConfigError, DataError
from metarec.data.readers import (
    id_column,
    numeric_column,
    read_frame,
    require_columns,
    require_rows,
)
from metarec.data.table import Feature, FilterReport, InteractionTable, encode_ids
from metarec.data.tasks import TaskConfig, TaskSet, TaskSplits, build_tasks

__all__ = [
    "ENCODED", "ConfigError", "DataError", "EpisodeBatch", "EpisodeCollator", "Feature", "FeatureBatch",
    "FilterReport",
    "InteractionTable", "SupportSweepCollator", "TaskConfig", "TaskSet", "TaskSplits", "build_tasks", "encode_ids",
    "id_column", "inputs", "numeric_column", "read_frame", "require_columns", "require_rows",
    "support_label",
]
