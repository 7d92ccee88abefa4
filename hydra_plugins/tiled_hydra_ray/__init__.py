"""tiled_hydra's Hydra launcher on a running Ray cluster (``hydra/launcher=ray_cluster``)."""
