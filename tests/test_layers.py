"""The package's layers (DESIGN.md §2): a file imports only from its own layer
or lower ones, and no two files import each other, directly or round a cycle.

    config, files, data, fp8  ->  parallel  ->  model  ->  infer, interop
      ->  train  ->  rl        (launch/ sits above the library)

Read from the source with `ast`, so imports inside functions count too (a
function-level import is how a cycle usually hides).
"""

import ast
import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1] / "deepseek_jax"

LAYERS = {"config": 0, "files": 0, "buffers": 0, "data": 0, "fp8": 0, "parallel": 1, "model": 2,
          "infer": 3, "interop": 3, "train": 4, "rl": 5}


def _modules() -> dict[str, pathlib.Path]:
  mods = {}
  for path in ROOT.rglob("*.py"):
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    if parts[-1] == "__init__":
      parts = parts[:-1]
    mods[".".join(parts)] = path
  return mods


def _resolve(name: str, mods) -> str | None:
  while name and name not in mods:
    name = name.rpartition(".")[0]
  return name or None


def import_graph() -> dict[str, set[str]]:
  """{module: the deepseek_jax modules it imports}, function-level imports included."""
  mods = _modules()
  graph = {}
  for mod, path in mods.items():
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
      if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
      elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
        # `from pkg import sub` imports the submodule when there is one
        names = [f"{node.module}.{a.name}" for a in node.names]
      else:
        continue
      out.update(_resolve(n, mods) for n in names if n.startswith("deepseek_jax"))
    out.discard(None)
    out.discard(mod)
    # a package's __init__ importing its own submodules is how packages work
    graph[mod] = {d for d in out if not d.startswith(mod + ".")}
  return graph


def layer_of(mod: str) -> int:
  parts = mod.split(".")
  if len(parts) == 1:
    return 0   # deepseek_jax/__init__.py re-exports the config
  if parts[1] not in LAYERS:
    raise KeyError(f"{mod}: give the package `{parts[1]}` a layer in tests/test_layers.py "
                   "LAYERS (and DESIGN.md §2)")
  return LAYERS[parts[1]]


def _cycles(graph) -> list[list[str]]:
  """Strongly connected components with more than one module (Tarjan)."""
  index, low, stack, on, out = {}, {}, [], set(), []

  def visit(v):
    index[v] = low[v] = len(index)
    stack.append(v)
    on.add(v)
    for w in graph.get(v, ()):
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      comp = []
      while True:
        w = stack.pop()
        on.discard(w)
        comp.append(w)
        if w == v:
          break
      if len(comp) > 1:
        out.append(sorted(comp))

  for v in sorted(graph):
    if v not in index:
      visit(v)
  return out


def test_the_graph_reader_sees_function_level_and_submodule_imports(tmp_path, monkeypatch):
  pkg = tmp_path / "deepseek_jax"
  for sub in ("model", "parallel"):
    (pkg / sub).mkdir(parents=True)
    (pkg / sub / "__init__.py").write_text("")
  (pkg / "__init__.py").write_text("")
  (pkg / "model" / "moe.py").write_text("from deepseek_jax.parallel import expert\n")
  (pkg / "parallel" / "expert.py").write_text(
      "def f():\n  from deepseek_jax.model.moe import route\n")
  monkeypatch.setattr(sys.modules[__name__], "ROOT", pkg)
  graph = import_graph()
  assert graph["deepseek_jax.model.moe"] == {"deepseek_jax.parallel.expert"}
  assert graph["deepseek_jax.parallel.expert"] == {"deepseek_jax.model.moe"}
  assert _cycles(graph) == [["deepseek_jax.model.moe", "deepseek_jax.parallel.expert"]]


def test_no_module_imports_a_higher_layer():
  graph = import_graph()
  upward = [f"{m} (layer {layer_of(m)}) imports {d} (layer {layer_of(d)})"
            for m, deps in sorted(graph.items()) for d in sorted(deps)
            if layer_of(d) > layer_of(m)]
  assert not upward, "\n".join(upward)


def test_no_import_cycles_between_files():
  cycles = _cycles(import_graph())
  assert not cycles, "import cycles: " + "; ".join(" <-> ".join(c) for c in cycles)


@pytest.mark.parametrize("package", sorted(LAYERS))
def test_every_package_has_a_layer(package):
  assert (ROOT / package).is_dir() or (ROOT / f"{package}.py").is_file()


# The issue-25 rule for the packages whose code is control flow: a function a
# reader holds in one screen. The one exception reads better whole (say why there).
MAX_FUNCTION_LINES = 85
LONG_FUNCTION_OK = {}


def test_functions_in_train_rl_and_parallel_fit_on_a_screen():
  long = []
  for package in ("train", "rl", "parallel"):
    for path in sorted((ROOT / package).rglob("*.py")):
      for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
          n = node.end_lineno - node.lineno + 1
          where = f"{path.relative_to(ROOT.parent)}:{node.lineno} {node.name}"
          if n > LONG_FUNCTION_OK.get(f"{package}/{path.name}:{node.name}", MAX_FUNCTION_LINES):
            long.append(f"{where} ({n} lines)")
  assert not long, "functions over the limit:\n" + "\n".join(long)
