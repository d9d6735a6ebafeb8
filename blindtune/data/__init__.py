"""Tasks (a registry of loaders with one interface) and client partitioning."""

from blindtune.data.gsm8k import extract_final_number
from blindtune.data.multiple_choice import load_multiple_choice_file
from blindtune.data.partition import (
    PartitionScheme,
    label_histogram,
    partition,
    partition_dirichlet,
    partition_iid,
)
from blindtune.data.task import (
    DataFormatError,
    Example,
    TaskData,
    TaskKind,
    UnknownTaskError,
    load_task,
    register_task,
    task_names,
)

__all__ = [
    "DataFormatError",
    "Example",
    "PartitionScheme",
    "TaskData",
    "TaskKind",
    "UnknownTaskError",
    "extract_final_number",
    "label_histogram",
    "load_multiple_choice_file",
    "load_task",
    "partition",
    "partition_dirichlet",
    "partition_iid",
    "register_task",
    "task_names",
]
