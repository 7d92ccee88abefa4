"""EfficientAd (lightning_model.py), imported on first use: the package itself loads no torch, so the
configuration check reads the constructor's settings without it."""

__all__ = ["EfficientAd"]


def __getattr__(name: str):
    if name == "EfficientAd":
        from tiled_hydra.models.efficient_ad.lightning_model import EfficientAd

        return EfficientAd
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
