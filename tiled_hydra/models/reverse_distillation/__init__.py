"""ReverseDistillation (lightning_model.py), imported on first use: the package itself loads no torch, so the
configuration check reads the constructor's settings without it."""

__all__ = ["ReverseDistillation"]


def __getattr__(name: str):
    if name == "ReverseDistillation":
        from tiled_hydra.models.reverse_distillation.lightning_model import ReverseDistillation

        return ReverseDistillation
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
