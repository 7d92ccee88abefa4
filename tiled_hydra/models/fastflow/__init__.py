"""Fastflow (lightning_model.py), imported on first use: the package itself loads no torch, so the
configuration check reads the constructor's settings without it."""

__all__ = ["Fastflow"]


def __getattr__(name: str):
    if name == "Fastflow":
        from tiled_hydra.models.fastflow.lightning_model import Fastflow

        return Fastflow
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
