"""``python -m tiled_hydra_runtime``: score images with an exported run (:mod:`tiled_hydra_runtime.cli`)."""

from tiled_hydra_runtime.cli import main

if __name__ == "__main__":
    main()
