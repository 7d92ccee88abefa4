"""Patchcore (lightning_model.py), imported on first use: the package itself loads no torch, so the
configuration check reads the constructor's settings without it."""

__all__ = ["Patchcore"]


def __getattr__(name: str):
    if name == "Patchcore":
        from tiled_hydra.models.patchcore.lightning_model import Patchcore

        return Patchcore
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
