"""`merge`: model and adapter merging for alignmerge.

Full models go through mergekit (`merge.run.run_mergekit`); LoRA adapters can also be merged in adapter space
(`merge.adapters`). The CLI (`merge.cli.main`) is a thin layer over `merge.run.run_merge_request`.
"""

from merge.methods import METHODS, MergeParams
from merge.run import MergeRequest, run_config_file, run_merge_request

__all__ = ["METHODS", "MergeParams", "MergeRequest", "run_config_file", "run_merge_request"]
