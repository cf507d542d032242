"""Stages: read params, write outputs atomically, log to MLflow. One module per ``localmim <stage>`` command."""

import importlib
import pkgutil

_INFRA = {"base", "tracking", "dag", "dag_render", "dvc_sync", "results", "lineage", "compare", "compare_plots"}


def load_all():
    """Import every stage module so each registers itself; returns ``base.STAGES``."""
    from localmim.stages import base

    for m in pkgutil.iter_modules(__path__):
        if m.name not in _INFRA and not m.name.startswith("_"):
            importlib.import_module(f"localmim.stages.{m.name}")
    return base.STAGES
