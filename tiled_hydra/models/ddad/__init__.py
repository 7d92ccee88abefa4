"""DDAD (lightning_model.py), imported on first use: the package itself loads no torch, so the
configuration check reads the constructor's settings without it."""

__all__ = ["DDAD"]


def __getattr__(name: str):
    if name == "DDAD":
        from tiled_hydra.models.ddad.lightning_model import DDAD

        return DDAD
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
