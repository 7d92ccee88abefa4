from tiled_hydra.models.padim_ipca.lightning_model import PadimIPCA

__all__ = ["PadimIPCA"]
