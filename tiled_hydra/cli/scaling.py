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
        from tiled_hydra.scaling.figures import study_figures
        from tiled_hydra.scaling.study import run_study, save_study

        study = run_study(cfg, run_dir)  # pins the threads (cfg.threads) and states them in scaling.json
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
    t = s.get("timing", {})
    threads = ", ".join(f"{k} {v}" for k, v in s.get("threads", {"torch": s.get("torch_threads")}).items())
    table = Table(title=f"{study['model']} ({study['backbone']}), batch size 1, {s['device']} ({threads} threads): "
                        f"{s['warmup']} warm-up + {s['repeats']} timed rounds round-robin, median [IQR]")
    for column in ("px", *study["components"], "counted", "measured peak", "s/image", "IQR", "steps"):
        table.add_column(column, justify="right")
    for r in study["measurements"]:
        table.add_row(str(r["resolution"]), *[format_bytes(r["components"][c]["counted_bytes"]) for c in study["components"]],
                      format_bytes(r["counted_bytes"]), format_bytes(r["peak_bytes"]), f"{r['seconds']:.4g}",
                      f"{r['seconds_q1']:.4g}-{r['seconds_q3']:.4g}" + (" noisy" if r["noisy"] else ""),
                      str(r["timed_steps"]))
    console = Console(width=None if sys.stdout.isatty() else 160)
    console.print(table)
    noisy = [r["resolution"] for r in study["measurements"] if r["noisy"]]
    if noisy:
        console.print(f"noisy: {', '.join(map(str, noisy))} px kept a relative IQR above {t.get('max_relative_iqr')} after "
                      f"{t.get('max_extra_rounds')} extra rounds (load average {s['load_average_at_start']} -> "
                      f"{s['load_average_at_end']})")
    names = {"counted_bytes": "memory (Eq. 1-3)", "peak_bytes": "measured peak", "seconds": "time per image"}
    for f in study["fits"]:
        if f["component"] != "total":
            continue
        h = f["holdout"]
        hold = f", hold-out at {h['x']:.0f} px: {100 * h['relative_error']:.3g} %" if h else ""
        show = (lambda v: f"{v:.4g} s") if f["quantity"] == "seconds" else format_bytes
        at = ", ".join(f"{k} px = {show(v)}" for k, v in f["extrapolated"].items())
        console.print(f"fit {names[f['quantity']]}: {f['verdict']}, R^2 = {f['r2']:.5f}{hold}; {at}")
    for f in study["fits"]:
        if f["component"] == "total" and f["verdict"] == "poor":
            console.print(f"poor fit: {names[f['quantity']]}: {'; '.join(f['verdict_reasons'])}: its extrapolations are "
                          "not to be trusted (the planner refuses it without allow_poor_fit=true)")
    if s["random_backbone_weights"]:
        console.print("note: random backbone weights (backbone.weights=none): memory and runtime do not depend on them")
    console.print(f"model state: {study['measurements'][0]['state_made_by']}; n_train = {s['n_train']}"
                  + (f", coreset_ratio = {s['coreset_ratio']}" if "coreset_ratio" in s else "")
                  + f"; peak memory: {s.get('peak_method', '?')}, each resolution "
                  + ("in its own process" if s.get("isolation") == "process" else "in this process"))


def cli() -> None:
    main()


if __name__ == "__main__":
    cli()
