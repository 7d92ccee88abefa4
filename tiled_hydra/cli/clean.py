"""``tiled-hydra-clean [root=outputs] [remove=true] [checkpoints=true]``: what experiments leave on disk.

Lists the run directories below ``root`` that failed before finishing (no results.json or shard.json
and no trained slot) and the disk their checkpoints take; ``remove=true`` deletes the failed ones,
``checkpoints=true`` the slot checkpoints of finished runs (results.json, the config and the slot
records stay, so the run's numbers remain; predict then needs a re-run).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from omegaconf import DictConfig

from tiled_hydra.cli.common import run_command
from tiled_hydra.errors import ConfigError

PROG = "tiled_hydra.clean"
USAGE = "usage: tiled-hydra-clean [root=DIR] [remove=true] [checkpoints=true]"


def run_dirs(root: Path) -> list[Path]:
    """Directories below ``root`` that a run made (they hold its saved config or its log)."""
    found = {p.parent for p in root.rglob(".hydra") if p.is_dir()} | {p.parent for p in root.rglob("tiled_hydra.log")}
    return sorted(d for d in found if not any(part == ".workers" for part in d.relative_to(root).parts))


def size_of(paths) -> int:
    return sum(p.stat().st_size for p in paths if p.is_file())


def is_finished(run_dir: Path) -> bool:
    return (run_dir / "results.json").is_file() or (run_dir / "shard.json").is_file()


def clean(options: DictConfig) -> int:
    root = Path(str(options.root)).expanduser()
    if not root.is_dir():
        raise ConfigError(f"root={root}: no such directory")
    for key in ("remove", "checkpoints"):
        if not isinstance(options[key], bool):
            raise ConfigError(f"{key}={options[key]!r}: expected true or false")
    failed, finished = [], []
    for run_dir in run_dirs(root):
        slots = list((run_dir / "checkpoints").glob("slot_*.pt"))
        if is_finished(run_dir):
            finished.append((run_dir, slots))
        elif not slots:
            failed.append(run_dir)
    held = sum(size_of(slots) for _, slots in finished)
    print(f"{root}: {len(finished)} finished runs ({held / 2**20:.1f} MiB of slot checkpoints), "
          f"{len(failed)} failed runs without results or trained slots")
    for run_dir in failed:
        print(f"  failed: {run_dir}" + ("  (removed)" if options.remove else ""))
        if options.remove:
            shutil.rmtree(run_dir, ignore_errors=True)
    if options.checkpoints:
        for run_dir, slots in finished:
            for path in slots:
                path.unlink()
        print(f"  deleted the checkpoints of {len(finished)} finished runs ({held / 2**20:.1f} MiB)")
    elif failed and not options.remove:
        print("  remove them with: tiled-hydra-clean remove=true" + (f" root={root}" if str(options.root) != "outputs" else ""))
    return 0


def main(argv: list[str] | None = None) -> None:
    run_command(PROG, "clean", USAGE, clean, argv)


if __name__ == "__main__":
    main()
