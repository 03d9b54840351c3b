"""Execute a notebook with parameters, papermill-style, using nbclient.

  python experiments/run_notebook.py experiments/moe_load_balance.ipynb \
      --param steps=40 --param preset='"small"' --out /tmp/out.ipynb

The notebook's cell tagged `parameters` holds the defaults; the overrides are
injected as a new code cell right after it (tagged `injected-parameters`), so
the executed notebook shows both. A `--param` value is read as a Python
literal (`steps=40`, `gamma=1e-2`, `model_overrides={"n_layers": 2}`,
`workdir_root=None`); anything that is not a literal is taken as a string
(`preset=small`). Unknown names are refused: they must be assigned in the
parameters cell.

The kernel is this Python interpreter (`sys.executable`), started in `cwd`
(default: the repository root) with the repository first on PYTHONPATH, so
the notebook imports this checkout's `deepseek_jax`.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import sys
import tempfile
from typing import Any

import nbformat
from jupyter_client import AsyncKernelManager
from jupyter_client.kernelspec import KernelSpec
from nbclient import NotebookClient

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PARAMETERS_TAG = "parameters"
INJECTED_TAG = "injected-parameters"


class ThisInterpreterKernelManager(AsyncKernelManager):
  """Starts the IPython kernel with sys.executable, whatever kernelspecs exist."""

  @property
  def kernel_spec(self) -> KernelSpec:
    return KernelSpec(argv=[sys.executable, "-m", "ipykernel_launcher", "-f",
                            "{connection_file}"],
                      display_name="Python 3 (this interpreter)", language="python")


def parameter_names(source: str) -> list[str]:
  """Names assigned at the top level of a parameters cell."""
  names = []
  for node in ast.parse(source).body:
    targets = (node.targets if isinstance(node, ast.Assign)
               else [node.target] if isinstance(node, ast.AnnAssign) else [])
    names += [t.id for t in targets if isinstance(t, ast.Name)]
  return names


def inject_parameters(nb: nbformat.NotebookNode, params: dict[str, Any]) -> None:
  """Inserts `name = repr(value)` lines after the cell tagged `parameters`."""
  idx = [i for i, c in enumerate(nb.cells)
         if PARAMETERS_TAG in c.get("metadata", {}).get("tags", [])]
  if len(idx) != 1:
    raise ValueError(f"the notebook must have exactly one cell tagged {PARAMETERS_TAG!r}; "
                     f"found {len(idx)}.")
  known = parameter_names(nb.cells[idx[0]].source)
  unknown = sorted(set(params) - set(known))
  if unknown:
    raise ValueError(f"unknown parameters {unknown}; the parameters cell defines {known}.")
  if not params:
    return
  source = "# Injected by experiments/run_notebook.py\n" + "".join(
      f"{k} = {v!r}\n" for k, v in params.items())
  cell = nbformat.v4.new_code_cell(source, metadata={"tags": [INJECTED_TAG]})
  nb.cells.insert(idx[0] + 1, cell)


def run_notebook(path: str, params: dict[str, Any] | None = None, *, out: str | None = None,
                 cwd: str = REPO_ROOT, timeout: int = 1800) -> nbformat.NotebookNode:
  """Executes the notebook at `path` with `params`; returns the executed notebook.

  out: also write the executed notebook there (even when a cell fails, so the
    traceback can be read). timeout: seconds allowed per cell.
  Raises nbclient.exceptions.CellExecutionError when a cell raises.
  """
  nb = nbformat.read(path, as_version=4)
  inject_parameters(nb, dict(params or {}))
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO_ROOT, env.get("PYTHONPATH")) if p)
  client = NotebookClient(nb, timeout=timeout, kernel_manager_class=ThisInterpreterKernelManager,
                          resources={"metadata": {"path": cwd}})
  try:
    client.execute(env=env)
  finally:
    if out:
      os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
      nbformat.write(nb, out)
  return nb


def image_outputs(nb: nbformat.NotebookNode) -> int:
  """How many figures (image/png outputs) the executed notebook holds."""
  return sum("image/png" in output.get("data", {})
             for cell in nb.cells for output in cell.get("outputs", []))


def stdout_lines(nb: nbformat.NotebookNode) -> list[str]:
  """Every line the executed notebook's cells printed to stdout, in order."""
  lines = []
  for cell in nb.cells:
    for output in cell.get("outputs", []):
      if output.get("output_type") == "stream" and output.get("name") == "stdout":
        lines += output.get("text", "").splitlines()
  return lines


def result_records(nb: nbformat.NotebookNode) -> list[dict]:
  """The JSON records of the notebook's `RESULT {...}` stdout lines, in order
  (the convention every notebook here prints its figures by)."""
  return [json.loads(line[len("RESULT "):]) for line in stdout_lines(nb)
          if line.startswith("RESULT ")]


def parse_param(text: str) -> tuple[str, Any]:
  """'steps=40' -> ('steps', 40); a value that is no Python literal stays a string."""
  name, sep, value = text.partition("=")
  if not sep or not name.strip().isidentifier():
    raise argparse.ArgumentTypeError(f"--param {text!r} must look like name=value.")
  try:
    return name.strip(), ast.literal_eval(value)
  except (ValueError, SyntaxError):
    return name.strip(), value


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("notebook")
  parser.add_argument("--param", action="append", type=parse_param, default=[],
                      metavar="NAME=VALUE", help="override a parameter (repeatable)")
  parser.add_argument("--out", help="where to write the executed notebook "
                      "(default: $TMPDIR/NAME.out.ipynb)")
  parser.add_argument("--timeout", type=int, default=1800, help="seconds per cell")
  args = parser.parse_args(argv)
  name = os.path.splitext(os.path.basename(args.notebook))[0]
  out = args.out or os.path.join(tempfile.gettempdir(), name + ".out.ipynb")
  nb = run_notebook(args.notebook, dict(args.param), out=out, timeout=args.timeout)
  for line in stdout_lines(nb):
    if line.startswith("RESULT "):
      print(line)
  print(f"executed notebook: {out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
