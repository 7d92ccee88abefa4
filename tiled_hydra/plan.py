"""``python -m tiled_hydra.plan``: a tile plan for a memory budget (:mod:`tiled_hydra.cli.plan`)."""

from tiled_hydra.cli.plan import cli

if __name__ == "__main__":
    cli()
