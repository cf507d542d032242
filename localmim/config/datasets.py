"""Params of the ``dataset`` stage (the DAG's ``dataset_<name>`` nodes): where the raw datasets are.

An empty path means the embedded mini dataset (``localmim synth`` into ``data/raw/<name>``). A path is read where
it is, never copied: the node writes a manifest of it (``data/raw/<name>.json``) and the stages downstream take the
root from there (see :mod:`localmim.data.raw.datasets`). Relative paths are relative to the working directory (the
repository root, where Snakemake and DVC run).
"""

from typing import Literal

from localmim.config import register_section
from localmim.config.base import Section


@register_section("datasets")
class DatasetsConfig(Section):
    imagenet: str = ""  # folder holding train/ and val/ (class folders; val may be the flat folder + ground truth)
    ade20k: str = ""  # folder holding ADEChallengeData2016/
    coco: str = ""  # folder holding train2017/, val2017/, annotations/
    # stat: path, size and mtime of every file (no byte read); content: sha256 of every file's bytes, cached by
    # path, size and mtime (a touched or copied file with the same bytes reruns nothing downstream)
    fingerprint: Literal["stat", "content"] = "stat"

    def path_of(self, name: str) -> str:
        return getattr(self, name)
