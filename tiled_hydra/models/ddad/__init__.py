from tiled_hydra.models.ddad.lightning_model import DDAD

__all__ = ["DDAD"]
