"""``tiled-hydra-compare sources=DIR``: paper-style tables and figures of finished runs, or the
cross-model figures of scaling studies (:mod:`tiled_hydra.analysis.compare`, :mod:`tiled_hydra.scaling.figures`)."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, ListConfig

from tiled_hydra.cli.common import run_command

PROG = "tiled_hydra.compare"
USAGE = "usage: tiled-hydra-compare sources=DIR|[DIR,DIR,...]|entity/project [out=DIR] [datastats=FILE] [key=value ...]"


def compare(options: DictConfig) -> int:
    from tiled_hydra.analysis.compare import compare as compare_runs
    from tiled_hydra.analysis.compare import is_offline_run
    from tiled_hydra.analysis.runs import CompareError
    from tiled_hydra.scaling.figures import compare_studies

    sources = [str(s) for s in options.sources] if isinstance(options.sources, ListConfig) else [str(options.sources)]
    single_dir = len(sources) == 1 and Path(sources[0]).is_dir() and not is_offline_run(Path(sources[0]))
    out = Path(options.out) if options.out else (Path(sources[0]) / "compare" if single_dir else Path("outputs/compare"))
    datastats = Path(options.datastats) if options.datastats else None
    if datastats and not datastats.is_file():
        raise CompareError(f"datastats={datastats}: no such file (write it with tiled-hydra-datastats)")
    if compare_studies(sources, out):  # paper 003 scaling studies only: cross-model figures drawn
        return 0
    compare_runs(sources, out, datastats, bool(options.from_wandb), str(options.baseline))
    return 0


def main(argv: list[str] | None = None) -> None:
    run_command(PROG, "compare", USAGE, compare, argv)


if __name__ == "__main__":
    main()
