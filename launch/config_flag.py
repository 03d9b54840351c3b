"""`--config=path/to/file.py` flags whose files load without deprecated imports.

ml_collections' `config_flags.DEFINE_config_file` gives launch scripts the
`--config=file.py[:arg]` flag plus typed `--config.a.b=value` overrides. Its
file loader (ml-collections 1.1) calls `SourceFileLoader.load_module()`,
deprecated since Python 3.4, warned about on every run on 3.11 and 3.12, and
removed in Python 3.15. `DEFINE_config_file` here keeps ml_collections' flag
(overrides, locking, `--helpfull`) and swaps in a parser that loads the file
with `importlib`'s spec / `exec_module` API instead.

`parse_flags_or_exit` turns a flag mistake (a bad value, an override of a field
the config lacks) into one line and a non-zero exit; `load_config` parses the
same `--config=file.py --config.a=b` arguments into a config without absl's
global FLAGS, raising ValueError with that line (a launcher run in-process).
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from typing import Sequence

from absl import flags, logging
from ml_collections import config_flags


class ConfigFileParser(flags.ArgumentParser):
  """Parses `path.py[:arg]` into `get_config(arg)` of that file, locked."""

  def __init__(self, name: str):
    self.name = name

  def parse(self, argument: str):
    path, *config_args = argument.split(":", 1)
    if not os.path.isfile(path):
      raise ValueError(f"--{self.name}={argument}: no such config file {path!r} "
                       f"(give the path of a Python file that defines get_config())")
    module_name = f"{self.name}_config"
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module   # so dataclasses/pickle can find it
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
      raise ValueError(f"--{self.name}={argument}: {path} defines no get_config()")
    config = module.get_config(*config_args)
    if hasattr(config, "lock"):
      config.lock()   # overrides may set fields, never add new ones
    return config

  def flag_type(self) -> str:
    return "config object"


def DEFINE_config_file(name: str, help_string: str,  # noqa: N802 (absl naming)
                       flag_values: flags.FlagValues = flags.FLAGS,
                       sys_argv: Sequence[str] | None = None) -> flags.FlagHolder:
  """A required-style config-file flag (no default) with `--name.field=` overrides
  (found in `sys_argv`, default sys.argv)."""
  holder = config_flags.DEFINE_config_file(name, None, help_string,
                                           flag_values=flag_values,
                                           sys_argv=None if sys_argv is None else list(sys_argv))
  flag_values[name].parser = ConfigFileParser(name)
  return holder


def flag_error_message(e: Exception) -> str:
  """One line for a flags.Error, AttributeError or KeyError that parsing flags
  raised: "flag error: ..." or, for an override of a config field that does
  not exist, "config error: ..." naming it."""
  if isinstance(e, flags.Error):
    return (f"flag error: {' '.join(str(e).split())} (pass --helpshort or --helpfull to see "
            "help on flags)")
  # An unknown field: ml_collections nests the KeyError's repr in an
  # AttributeError: "'\\'name\\'\\nDid you mean ...'".
  text = str(e.args[0] if e.args else e).replace("\\n", "\n").replace("\\'", "'")
  detail = " ".join(text.replace("'", "").split()).strip('"')
  return ("config error: an override names a field the config does not have: "
          f"{detail} (see the config file; config.model.* are ModelConfig fields)")


def load_config(path: str, overrides: Sequence[str] = (), name: str = "config"):
  """The locked config that `--{name}={path} *overrides` gives a launcher (e.g.
  overrides=["--config.steps=3"]), parsed like the command line but without
  touching absl's global FLAGS: for running a launcher in-process. Raises
  ValueError with flag_error_message's line for a missing config file, a bad
  value or an override of a field the config does not have."""
  argv = [name, f"--{name}={path}", *overrides]
  flag_values = flags.FlagValues()
  DEFINE_config_file(name, "config file", flag_values=flag_values, sys_argv=argv)
  try:
    flag_values(argv)
  except (flags.Error, AttributeError, KeyError) as e:
    raise ValueError(flag_error_message(e)) from e
  return flag_values[name].value


def parse_flags_or_exit(argv: list[str], prog: str) -> list[str]:
  """absl `app.run(..., flags_parser=...)`: parses flags; a bad flag, or an
  override of a config field that does not exist, exits with one line naming
  it (ml_collections raises a chained AttributeError traceback for the latter)."""
  try:
    return flags.FLAGS(argv)
  except (flags.Error, AttributeError, KeyError) as e:
    sys.exit(f"{prog}: {flag_error_message(e)}")


def begin_main(argv: Sequence[str], prog: str) -> None:
  """The start every launch.* main shares: positional arguments are refused
  naming them (every option is a --flag), and absl logging goes to WARNING
  unless --verbosity was given (orbax logs each save and restore at INFO,
  JAX the backends it could not start)."""
  if len(argv) > 1:
    sys.exit(f"{prog}: error: unexpected arguments {list(argv[1:])}; every option is a "
             "--flag=value (see --help).")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)


def print_json_or_exit(prog: str, errors: tuple[type[BaseException], ...], run) -> None:
  """Print run()'s result as one JSON line; a user's mistake (one of
  `errors`) exits with one line `prog: error: ...` instead of a traceback."""
  try:
    result = run()
  except errors as e:
    sys.exit(f"{prog}: error: {' '.join(str(e).split())}")
  print(json.dumps(result))

