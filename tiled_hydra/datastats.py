"""``python -m tiled_hydra.datastats``: defect sizes of datasets (:mod:`tiled_hydra.cli.datastats`)."""

from tiled_hydra.cli.datastats import main

if __name__ == "__main__":
    main()
