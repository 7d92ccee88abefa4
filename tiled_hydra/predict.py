"""``python -m tiled_hydra.predict``: score new images with a trained run (:mod:`tiled_hydra.cli.predict`)."""

from tiled_hydra.cli.predict import main

if __name__ == "__main__":
    main()
