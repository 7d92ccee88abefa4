from tiled_hydra.models.efficient_ad.lightning_model import EfficientAd

__all__ = ["EfficientAd"]
