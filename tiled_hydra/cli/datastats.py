"""``tiled-hydra-datastats dataset=... [out=FILE]``: defect sizes of datasets (:mod:`tiled_hydra.analysis.datastats`)."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from tiled_hydra.cli.common import run_command

PROG = "tiled_hydra.datastats"
USAGE = "usage: tiled-hydra-datastats [dataset=NAME] [dataset.KEY=VALUE ...] [out=FILE] [image_size=PX]"


def datastats(options: DictConfig) -> int:
    from tiled_hydra.analysis.datastats import measure, update_json
    from tiled_hydra.errors import ConfigError

    if not isinstance(options.image_size, int) or options.image_size < 8:
        raise ConfigError(f"image_size={options.image_size!r}: expected an integer >= 8 (px)")
    stats = measure(options.dataset, int(options.image_size))
    out = Path(options.out)
    update_json(out, stats)
    for key, value in stats.items():
        print(f"{key}: defect share {100 * value['defect_share']:.2f}% of the image "
              f"(median {100 * value['defect_share_median']:.2f}%, {value['defective_images']} defective images)")
    print(f"written: {out}")
    return 0


def main(argv: list[str] | None = None) -> None:
    run_command(PROG, "datastats", USAGE, datastats, argv)


if __name__ == "__main__":
    main()
