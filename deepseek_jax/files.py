"""Atomic file writes: the one helper every writer of the project uses.

A reader (a resumed run, a plot viewer, a user's `cat`) never sees half a
file: the content goes to a temp file in the same directory, which is then
renamed over the target (`os.replace` is atomic on POSIX within a file
system). A crash or kill mid-write leaves the old file whole and at most a
`.<name>.*.tmp` leftover.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any, Callable


def atomic_write(path: str, write: Callable[[str], None]) -> None:
  """Calls write(tmp) on a temp file next to `path`, then renames it over `path`."""
  directory = os.path.dirname(os.path.abspath(path))
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
  os.close(fd)
  try:
    write(tmp)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the usual file mode
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise


def atomic_text(text: str, path: str) -> None:
  """Writes the string `text` to `path` atomically."""
  def write(tmp):
    with open(tmp, "w") as f:
      f.write(text)
  atomic_write(path, write)


def atomic_json(obj: Any, path: str, *, indent: int | None = 2) -> None:
  """Writes `obj` as JSON to `path` atomically (argument order of json.dump)."""
  atomic_text(json.dumps(obj, indent=indent) + "\n", path)
