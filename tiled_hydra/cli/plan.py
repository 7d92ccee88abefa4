"""``tiled-hydra-plan model=patchcore image_size=[2048,2448] memory_budget=8GiB``: the tile plan for a
memory budget from paper 003's fitted curves (``python -m tiled_hydra.plan``; conf/plan.yaml)."""

from __future__ import annotations

from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from tiled_hydra.cli.common import fail
from tiled_hydra.config import CONF_DIR
from tiled_hydra.errors import TiledHydraError

PROG = "tiled_hydra.plan"


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="plan")
def main(cfg: DictConfig) -> None:
    from tiled_hydra.scaling.plan import describe, plan_from_cfg

    try:
        plan, study = plan_from_cfg(cfg, Path(HydraConfig.get().runtime.output_dir))
    except TiledHydraError as err:
        fail(PROG, err)
    print(describe(plan, study, cfg))


def cli() -> None:
    main()


if __name__ == "__main__":
    cli()
