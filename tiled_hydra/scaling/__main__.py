"""``python -m tiled_hydra.scaling``: paper 003's scaling study (:mod:`tiled_hydra.cli.scaling`)."""

from tiled_hydra.cli.scaling import cli

if __name__ == "__main__":
    cli()
