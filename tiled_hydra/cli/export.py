"""Export a trained run's slot graphs and manifest: ``tiled-hydra-export run_dir=DIR [output=DIR]``
(``python -m tiled_hydra.export``; options and their defaults: conf/export.yaml, or ``--help``)."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from omegaconf import DictConfig

from tiled_hydra.cli.common import run_command
from tiled_hydra.errors import ConfigError

log = logging.getLogger("tiled_hydra")
PROG = "tiled_hydra.export"
USAGE = "usage: tiled-hydra-export run_dir=RUN_DIR [output=DIR] [format=onnx|openvino] [key=value ...]"


def export(args: DictConfig) -> int:
    if not isinstance(args.check, bool):
        raise ConfigError(f"check={args.check!r}: expected true or false")
    try:
        import onnx  # noqa: F401  (torch.onnx.export writes through it)
    except ImportError:
        raise ConfigError("export needs the onnx package: pip install 'tiled_hydra[export]'") from None
    run_dir = Path(args.run_dir).expanduser()
    output = Path(args.output).expanduser() if args.output else Path("exports") / run_dir.resolve().name
    from tiled_hydra.export.onnx import export_run  # torch and the models: after the cheap checks

    start = time.perf_counter()
    manifest = export_run(run_dir, output, str(args.format), check=bool(args.check))
    size = sum(f.stat().st_size for f in output.iterdir() if f.is_file())
    print(f"exported {run_dir} to {output} ({size / 2**20:.1f} MiB, {time.perf_counter() - start:.1f} s); "
          f"score images with: python -m tiled_hydra_runtime artifact={output} input=DIR")
    log.debug("manifest: %s", manifest)
    return 0


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    run_command(PROG, "export", USAGE, export, argv)


if __name__ == "__main__":
    main()
