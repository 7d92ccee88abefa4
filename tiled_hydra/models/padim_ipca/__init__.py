"""PadimIPCA (lightning_model.py), imported on first use: the package itself loads no torch, so the
configuration check reads the constructor's settings without it."""

__all__ = ["PadimIPCA"]


def __getattr__(name: str):
    if name == "PadimIPCA":
        from tiled_hydra.models.padim_ipca.lightning_model import PadimIPCA

        return PadimIPCA
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
