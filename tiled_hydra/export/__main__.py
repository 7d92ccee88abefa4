"""``python -m tiled_hydra.export``: write a trained run's graphs and manifest (:mod:`tiled_hydra.cli.export`)."""

from tiled_hydra.cli.export import main

if __name__ == "__main__":
    main()
