"""``python -m tiled_hydra``: the main command (:mod:`tiled_hydra.cli.train`)."""

from tiled_hydra.cli.train import cli

if __name__ == "__main__":
    cli()
