"""Paper 003's scaling study: memory and runtime of every model versus image resolution.

- ``counting``: components of a slot, parameter/buffer bytes and hook-counted activation bytes
  (paper 003, Eq. 1-3), wall-clock time per component;
- ``measure``: a slot fitted at each resolution, measured at batch size 1;
- ``fit``: least-squares quadratics (Eq. 3-4), R^2, hold-out check, extrapolation;
- ``figures``: per-study figures (Fig. 2-7) and cross-model figures and table (Fig. 8-9);
- ``python -m tiled_hydra.scaling``: the Hydra command (conf/scaling.yaml).
"""
