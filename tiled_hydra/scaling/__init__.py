"""Paper 003's scaling study: memory and runtime of every model versus image resolution.

- ``counting``: components of a slot, parameter/buffer bytes and hook-counted activation bytes
  (paper 003, Eq. 1-3), wall-clock time per component;
- ``measure``: a slot fitted at one resolution, its counts, step peaks and timed steps (batch size 1);
- ``isolation``: each resolution's slot in a fresh process, so its measured peak inherits nothing;
- ``protocol``: round-robin timing over the resolutions, medians with their spread, re-measured noisy points;
- ``fit``: non-negative least-squares quadratics (Eq. 3-4), R^2, hold-out check, verdict, extrapolation;
- ``figures``: per-study figures (Fig. 2-7) and cross-model figures and table (Fig. 8-9);
- ``python -m tiled_hydra.scaling``: the Hydra command (conf/scaling.yaml).
"""
