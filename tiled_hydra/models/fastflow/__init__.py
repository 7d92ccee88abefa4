from tiled_hydra.models.fastflow.lightning_model import Fastflow

__all__ = ["Fastflow"]
