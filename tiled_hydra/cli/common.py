"""What every command shares: Hydra's ``key=value`` arguments, ``--help``, one-line errors, exit codes.

Exit codes, the same for every command: 0 done; 1 the run failed (data missing or unreadable, a
worker died, a file could not be written); 2 a usage error (an unknown option, a value out of
range, a run dir of another configuration). Every error is one line on stderr, prefixed with the
command's name.

Commands without a run directory of their own (predict, compare, datastats, clean) compose their
options from ``conf/<command>.yaml`` with Hydra's compose API: the same override grammar as the
main command (``key=value``, lists ``key=[a,b]``, quoting), and the YAML file with its comments
is the option reference that ``--help`` prints.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Callable
from typing import NoReturn

from tiled_hydra.config import CONF_DIR
from tiled_hydra.errors import ConfigError, TiledHydraError

RUN_FAILED, USAGE_ERROR = 1, 2


def exit_code(err: BaseException) -> int:
    return USAGE_ERROR if isinstance(err, ConfigError) else RUN_FAILED


def fail(prog: str, err: BaseException) -> NoReturn:
    if any(isinstance(h, logging.FileHandler) for h in logging.getLogger().handlers):  # a Hydra job's log file
        logging.getLogger("tiled_hydra").error("%s", err)
    print(f"{prog}: error: {err}", file=sys.stderr)
    sys.exit(exit_code(err))


def first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


# A value Hydra's grammar cannot read unquoted (spaces, non-ASCII letters, most punctuation); quoting
# it makes it one string. Sweeps, lists, dicts, interpolations and quoted values are left as typed.
_KEY_VALUE = re.compile(r"^([+~]{0,2}[\w.@/\-]+)=(.*)$", re.S)
_STRUCTURED = re.compile(r"^[\[{'\"]|\$\{|,")


def quote_plain_values(args: list[str]) -> list[str]:
    """``hydra.run.dir=/tmp/my runs/é`` -> ``hydra.run.dir='/tmp/my runs/é'`` (only where Hydra's
    parser would fail on the value as typed)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    out = []
    for arg in args:
        match = _KEY_VALUE.match(arg)
        if match and match.group(2) and not _STRUCTURED.search(match.group(2)):
            try:
                parser.parse_override(arg)
            except Exception:
                value = match.group(2).replace("\\", "\\\\").replace("'", "\\'")
                arg = f"{match.group(1)}='{value}'"
        out.append(arg)
    return out


def shell_quote(arg: str) -> str:
    """One override as it must be typed in a POSIX shell to reach the program unchanged."""
    import shlex

    return shlex.quote(arg)


def option_reference(config_name: str) -> str:
    """conf/<config_name>.yaml as written: its keys, defaults and comments."""
    return (CONF_DIR / f"{config_name}.yaml").read_text().rstrip()


def compose_options(prog: str, config_name: str, argv: list[str]):
    """The command's options: conf/<config_name>.yaml with the ``key=value`` overrides of ``argv``."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    for arg in argv:
        if "=" not in arg:
            raise ConfigError(f"argument {arg!r} is not key=value (see {prog} --help)")
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            options = compose(config_name, overrides=quote_plain_values(argv))
    except (HydraException, OmegaConfBaseException) as err:
        raise ConfigError(f"{first_line(err)} (see {prog} --help)") from None
    finally:
        GlobalHydra.instance().clear()
    missing = sorted(OmegaConf.missing_keys(options))
    if missing:
        raise ConfigError(f"{missing[0]}=... is required (see {prog} --help)")
    return options
    from omegaconf import OmegaConf

    missing = sorted(OmegaConf.missing_keys(options))  # the ??? of conf/<config_name>.yaml
    if missing:
        raise ConfigError(f"{', '.join(f'{key}=...' for key in missing)} required (see {prog} --help)")
    return options


def run_command(prog: str, config_name: str, usage: str, body: Callable, argv: list[str] | None = None) -> None:
    """Parse ``argv`` (default: the command line) into options, call ``body(options) -> exit code``,
    and exit with it; ``--help`` prints ``usage`` and the option reference."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if any(a in ("-h", "--help") for a in argv):
        print(f"{usage}\n\noptions (key=value; defaults and meaning, from conf/{config_name}.yaml):\n\n"
              f"{option_reference(config_name)}")
        sys.exit(0)
    try:
        options = compose_options(prog, config_name, argv)
        code = body(options)
    except TiledHydraError as err:
        fail(prog, err)
    sys.exit(code or 0)
