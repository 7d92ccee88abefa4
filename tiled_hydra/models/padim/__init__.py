"""Padim (lightning_model.py), imported on first use: the package itself loads no torch, so the
configuration check reads the constructor's settings without it."""

__all__ = ["Padim"]


def __getattr__(name: str):
    if name == "Padim":
        from tiled_hydra.models.padim.lightning_model import Padim

        return Padim
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
