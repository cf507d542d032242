"""Stages: read params, write outputs atomically, log to MLflow. One module per ``localmim <stage>`` command."""

import importlib
import pkgutil


def load_all():
    """Import every stage module so each registers itself; returns :data:`localmim.pipeline.stage.STAGES`."""
    from localmim.pipeline import stage

    for m in pkgutil.iter_modules(__path__):
        if not m.name.startswith("_"):
            importlib.import_module(f"localmim.stages.{m.name}")
    return stage.STAGES
