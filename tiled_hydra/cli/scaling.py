"""``tiled-hydra-scaling model=patchcore resolutions=[256,384,512,640,768,1024]``: paper 003's study of
one model's memory and runtime against resolution (``python -m tiled_hydra.scaling``; conf/scaling.yaml).

Composed by Hydra like the main command (backbone, model options, experiment presets, -m over models).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from tiled_hydra.cli.common import fail
from tiled_hydra.config import CONF_DIR
from tiled_hydra.errors import TiledHydraError

log = logging.getLogger("tiled_hydra")
PROG = "tiled_hydra.scaling"


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="scaling")
def main(cfg: DictConfig) -> None:
    from tiled_hydra.scaling.study import RESULT_FILE, check_resolutions

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    done = run_dir / RESULT_FILE
    if cfg.get("skip_completed", False) and done.exists():
        log.info("skipped: %s exists (skip_completed=false runs it again)", done)
        return
    try:
        check_resolutions(cfg.resolutions)
        import torch

        from tiled_hydra.scaling.figures import study_figures
        from tiled_hydra.scaling.study import run_study, save_study

        if cfg.get("threads"):
            torch.set_num_threads(int(cfg.threads))
        study = run_study(cfg, run_dir)
        study["figures"] = [str(p.name) for p in study_figures(study, run_dir)]
        save_study(run_dir, study)
    except TiledHydraError as err:
        fail(PROG, err)
    print_summary(study)
    log.info("study: %s", done)


def print_summary(study: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    from tiled_hydra.scaling.units import format_bytes

    s = study["settings"]
    table = Table(title=f"{study['model']} ({study['backbone']}), batch size 1, {s['device']}: "
                        f"{s['warmup']} warm-up + {s['repeats']} timed steps")
    for column in ("px", *study["components"], "counted", "measured peak", "s/image"):
        table.add_column(column, justify="right")
    for r in study["measurements"]:
        table.add_row(str(r["resolution"]), *[format_bytes(r["components"][c]["counted_bytes"]) for c in study["components"]],
                      format_bytes(r["counted_bytes"]), format_bytes(r["peak_bytes"]), f"{r['seconds']:.3f}")
    console = Console(width=None if sys.stdout.isatty() else 160)
    console.print(table)
    for f in study["fits"]:
        if f["component"] == "total":
            h = f["holdout"]
            hold = f", hold-out at {h['x']:.0f} px: {100 * h['relative_error']:.2f} %" if h else ""
            console.print(f"fit {f['quantity']}: R^2 = {f['r2']:.5f}{hold}; at {', '.join(f'{k} px = {v:.4g}' for k, v in f['extrapolated'].items())}")
    if s["random_backbone_weights"]:
        console.print("note: random backbone weights (backbone.weights=none): memory and runtime do not depend on them")
    console.print(f"model state: {study['measurements'][0]['state_made_by']}; n_train = {s['n_train']}"
                  + (f", coreset_ratio = {s['coreset_ratio']}" if "coreset_ratio" in s else ""))



def cli() -> None:
    main()


if __name__ == "__main__":
    cli()
