from tiled_hydra.models.padim.lightning_model import Padim

__all__ = ["Padim"]
