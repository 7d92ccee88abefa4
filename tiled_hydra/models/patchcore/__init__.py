from tiled_hydra.models.patchcore.lightning_model import Patchcore

__all__ = ["Patchcore"]
