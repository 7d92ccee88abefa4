from tiled_hydra.models.reverse_distillation.lightning_model import ReverseDistillation

__all__ = ["ReverseDistillation"]
