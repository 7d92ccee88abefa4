"""``python -m tiled_hydra_runtime artifact=DIR input=DIR_OR_GLOB [output=DIR] [key=value ...]``
(``tiled-hydra-score``): score image files with an exported run.

Writes OUTPUT/predictions.csv (path, score, normalized_score, pred_label, anomalous_area_px,
anomalous_area_fraction, map), OUTPUT/maps/NAME.png (16-bit, normalised: the pixel threshold is
code 32768) or .npy (raw float32), each at the image's own size, and OUTPUT/failed.csv when some
files could not be read. Exit code 0 when every file was scored, 1 when some were not, 2 on a
usage error; every error is one line.
"""

from __future__ import annotations

import csv
import glob
import os
import sys
import time
from pathlib import Path

from tiled_hydra_runtime.errors import RuntimeFailure, UsageError
from tiled_hydra_runtime.filters import resize_bilinear
from tiled_hydra_runtime.images import IMAGE_SUFFIXES
from tiled_hydra_runtime.postprocess import write_map

PROG = "tiled_hydra_runtime"
OPTIONS = {  # name: (default, meaning)
    "artifact": (None, "required: an exported run (python -m tiled_hydra.export)"),
    "input": (None, "required: a folder (every image below it) or a glob pattern in quotes ('imgs/**/*.png')"),
    "output": (None, "folder to write; default: predictions/<artifact folder name> here"),
    "maps": ("png", "png: 16-bit PNG of the normalised map (pixel threshold at 32768) | npy: raw float32 | none"),
    "batch_size": ("8", "images per inference step (>= 1)"),
    "threads": ("0", "CPU threads of the graphs; 0: onnxruntime's default (one per core)"),
    "verify": ("true", "check every artifact file against its sha256 in manifest.json before scoring"),
}
COLUMNS = ["path", "score", "normalized_score", "pred_label", "anomalous_area_px", "anomalous_area_fraction", "map"]


def usage() -> str:
    lines = [f"usage: python -m {PROG} artifact=DIR input=DIR_OR_GLOB [output=DIR] [key=value ...]", "", "options:"]
    lines += [f"  {name}={'' if default is None else default}  {meaning}" for name, (default, meaning) in OPTIONS.items()]
    return "\n".join(lines)


def parse(argv: list[str]) -> dict[str, str]:
    options = {name: default for name, (default, _) in OPTIONS.items()}
    for arg in argv:
        name, sep, value = arg.partition("=")
        if not sep:
            raise UsageError(f"argument {arg!r} is not key=value (see --help)")
        if name not in OPTIONS:
            raise UsageError(f"unknown option {name!r}; options: {', '.join(OPTIONS)}")
        options[name] = value
    for name in ("artifact", "input"):
        if not options[name]:
            raise UsageError(f"missing {name}=...; see --help")
    if options["maps"] not in ("png", "npy", "none"):
        raise UsageError(f"maps={options['maps']}: choose png, npy or none")
    for name in ("batch_size", "threads"):
        if not options[name].isdigit() or (name == "batch_size" and int(options[name]) < 1):
            raise UsageError(f"{name}={options[name]}: expected an integer >= {1 if name == 'batch_size' else 0}")
    if options["verify"] not in ("true", "false"):
        raise UsageError(f"verify={options['verify']}: choose true or false")
    return options


def list_inputs(pattern: str) -> tuple[list[Path], Path]:
    """Files to score (sorted) and the folder their output names are relative to."""
    path = Path(pattern).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))
        base = path
    else:
        files = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
        base = Path(os.path.commonpath([str(f.parent) for f in files])) if files else path.parent
    if not files:
        raise RuntimeFailure(f"input={pattern}: no image files found")
    return files, base


def write_csv(path: Path, header: list[str], rows: list) -> None:
    tmp = path.with_suffix(".csv.tmp")
    with tmp.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    os.replace(tmp, path)


def score(options: dict[str, str]) -> int:
    from tiled_hydra_runtime.detector import load

    artifact = Path(options["artifact"]).expanduser()
    out = Path(options["output"]).expanduser() if options["output"] else Path("predictions") / artifact.resolve().name
    files, base = list_inputs(options["input"])
    try:
        (out / "maps").mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UsageError(f"output={out} is not writable ({err.strerror or type(err).__name__})") from None
    detector = load(artifact, threads=int(options["threads"]), verify=options["verify"] == "true")
    post, batch = detector.post, int(options["batch_size"])
    rows, failed = [], []
    start = time.perf_counter()
    for first in range(0, len(files), batch):
        chunk = files[first : first + batch]
        for path, result in zip(chunk, detector.score_files(chunk)):
            if isinstance(result, RuntimeFailure):
                failed.append((str(path), str(result)))
                continue
            own = resize_bilinear(result.map, result.size)
            area = int(post.masks(own).sum())
            map_file = ""
            if options["maps"] != "none":
                name = "__".join(path.relative_to(base).with_suffix("").parts)
                map_file = str(write_map(out / "maps" / name, own, post, options["maps"]))
            rows.append([str(path), repr(result.score), round(result.normalized_score, 6), int(result.label), area,
                         round(area / own.size, 6), map_file])
    seconds = time.perf_counter() - start
    write_csv(out / "predictions.csv", COLUMNS, rows)
    if failed:
        write_csv(out / "failed.csv", ["path", "cause"], failed)
        for _, cause in failed:
            print(f"{PROG}: unreadable: {cause}", file=sys.stderr)
    flagged = sum(row[3] for row in rows)
    print(f"{len(rows)} images scored, {flagged} flagged anomalous, {len(failed)} unreadable; "
          f"{len(rows) / max(seconds, 1e-9):.2f} images/s; {out / 'predictions.csv'}")
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    if any(a in ("-h", "--help") for a in argv):
        print(usage())
        sys.exit(0)
    try:
        code = score(parse(argv))
    except RuntimeFailure as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        sys.exit(err.exit_code)
    sys.exit(code)
