"""``python -m tiled_hydra.compare``: tables and figures of finished runs (:mod:`tiled_hydra.cli.compare`)."""

from tiled_hydra.cli.compare import main

if __name__ == "__main__":
    main()
