"""``python -m tiled_hydra.clean``: list and remove failed runs and checkpoints (:mod:`tiled_hydra.cli.clean`)."""

from tiled_hydra.cli.clean import main

if __name__ == "__main__":
    main()
