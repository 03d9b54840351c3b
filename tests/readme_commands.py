"""The README's shell commands, in order: extracted, checked, and run.

  python tests/readme_commands.py                 # list them and what --run does to each
  python tests/readme_commands.py --run DIR       # run them in order in the scratch DIR
  python tests/readme_commands.py --run DIR --full   # ... without shortening the runs
  python tests/readme_commands.py --run DIR --from_line 90   # resume: skip earlier commands

A user copies the README's commands one after another; this does the same.
`extract` reads every indented or fenced shell block of README.md (a line
ending in a backslash continues), keeps the commands a fresh clone can run
here (no placeholders such as DIR, /ckpt/, /shared/ or `...`, no installs,
no cluster launchers), and `check` verifies each statically: the module
exists, every --flag is one the module (or a shared flag module) defines,
every --config file exists and every --config.a.b=... names a field of its
get_config(). tests/test_readme_commands.py runs `check` over all of them
in the default suite (a renamed flag or field fails there).

`--run DIR` executes them in order with `bash -c` in DIR (a `launch`
symlink to the repository's, PYTHONPATH at the repository; the README's
/tmp/ paths are used as printed, since config files name them too), appending `SHORTEN[module]` to each so the journey takes
minutes, not hours: training runs keep a few steps, except the README
demo's first run (runs/demo), which the later commands sample and
fine-tune from and therefore trains in full. It prints one JSON line per
command (rc, seconds, the command run) and exits non-zero if any failed.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# What makes a command impossible to run as printed on a fresh clone here.
PLACEHOLDERS = ("...", "/ckpt/", "=DIR", "/shared/", "srun ", "=N ", "=i", "10.0.0.1",
                "tensorboard ", "/path/",
                "runs/v2lite ")       # made by the /ckpt/ command (a published checkpoint)
# Flags absl defines for every program.
ABSL_FLAGS = {"help", "helpfull", "helpshort", "verbosity", "v", "logtostderr",
              "alsologtostderr", "log_dir", "flagfile"}
# Flag modules a launch main imports beside its own file.
SHARED_FLAG_FILES = ("launch/checkpoint_flags.py", "launch/config_flag.py")
# --run: flags appended to each module's commands (the last value wins).
SHORTEN = {
    "launch.train": ["--config.steps=6", "--config.warmup_steps=2", "--config.eval_every=0",
                     "--config.n_eval_problems=8"],
    # (a GRPO config's SFT stage runs its own config file in full)
    "launch.grpo": ["--config.steps=2", "--config.eval_every=0", "--config.n_eval_problems=8",
                    "--config.prompts_per_step=4", "--config.group_size=2"],
    "launch.rejection_sample": ["--n_prompts=64", "--k=2"],
    "launch.make_preferences": ["--n_prompts=64", "--k=2"],
    "launch.evaluate": ["--samples=2"],
}
FULL_LENGTH = ("--workdir=runs/demo",)      # runs the later commands build on


@dataclasses.dataclass(frozen=True)
class Command:
  line: int          # README line of its first line
  text: str          # joined continuation lines, comments dropped

  @property
  def module(self) -> str | None:
    m = re.search(r"python3? -m (launch\.\w+)", self.text)
    return m.group(1) if m else None


def _blocks(lines: list[str]):
  """(first line number, [lines]) of each indented or fenced shell block."""
  fenced, block, start = None, [], 0
  for i, line in enumerate(lines + [""], 1):
    if line.startswith("```"):
      if fenced is None:
        fenced, block, start = line[3:].strip(), [], i + 1
      else:
        if fenced in ("", "sh", "bash", "shell", "console"):
          yield start, block
        fenced, block = None, []
      continue
    if fenced is not None:
      block.append(line)
    elif line.startswith("    ") and (block or not lines[i - 2].strip() or i == 1):
      if not block:
        start = i
      block.append(line[4:])
    elif block and not line.strip() and i < len(lines) and lines[i].startswith("    "):
      block.append("")
    elif block:
      yield start, block
      block = []


def extract(readme: str = os.path.join(REPO, "README.md")) -> list[Command]:
  """Every shell command of the README, in order (module doc)."""
  commands = []
  for start, block in _blocks(open(readme).read().splitlines()):
    text, first = "", None
    for n, raw in enumerate(block, start):
      line = raw.split("  # ")[0].rstrip() if not raw.lstrip().startswith("#") else ""
      if not line and not text:
        continue
      first = n if first is None else first
      text += " " + line.rstrip("\\").strip()
      if not line.endswith("\\"):
        if text.strip():
          commands.append(Command(first, " ".join(text.split())))
        text, first = "", None
  return commands


def runnable(cmd: Command) -> bool:
  """A command this machine can run as printed (module doc)."""
  return (cmd.module is not None and "pytest" not in cmd.text
          and not any(p in cmd.text + " " for p in PLACEHOLDERS))


def _main_part(text: str) -> str:
  """The launch command of an install-and-run line (after the last &&)."""
  return text.rsplit("&&", 1)[-1].strip() if "pip install" in text else text


def _defined_flags(module: str) -> set[str]:
  names = set(ABSL_FLAGS)
  for path in (module.replace(".", "/") + ".py",) + SHARED_FLAG_FILES:
    src = open(os.path.join(REPO, path)).read()
    names |= set(re.findall(r"DEFINE_\w+\(\s*\"(\w+)\"", src))
  return names


def _get_config(path: str):
  file, _, arg = path.partition(":")
  spec = importlib.util.spec_from_file_location("readme_config", os.path.join(REPO, file))
  mod = importlib.util.module_from_spec(spec)
  sys.path.insert(0, REPO)
  try:
    spec.loader.exec_module(mod)
  finally:
    sys.path.remove(REPO)
  return mod.get_config(arg) if arg else mod.get_config()


def check(cmd: Command) -> list[str]:
  """What is wrong with a runnable command as printed ([] = nothing); also
  used on the `prepared` (shortened) form."""
  problems, module = [], cmd.module
  if not os.path.exists(os.path.join(REPO, module.replace(".", "/") + ".py")):
    return [f"no module {module}"]
  flags = _defined_flags(module)
  config = None
  for arg in shlex.split(_main_part(cmd.text).replace("& done; wait", "")):
    m = re.match(r"--(no)?([\w.]+)(=(.*))?$", arg)
    if m is None:
      continue
    name, value = m.group(2), m.group(4)
    if name == "config":
      if not os.path.exists(os.path.join(REPO, value.partition(":")[0])):
        problems.append(f"--config={value}: no such file")
      else:
        config = _get_config(value)
    elif name.startswith("config."):
      node = config
      for part in name.split(".")[1:]:
        if node is None or part not in node:
          problems.append(f"--{name}: not a field of the --config file's get_config()")
          break
        node = node[part]
    elif name not in flags:
      problems.append(f"--{name}: {module} defines no such flag")
  return problems


def prepared(cmd: Command, scratch: str, full: bool = False) -> str:
  """The command `--run` executes in `scratch` (module doc)."""
  text = _main_part(cmd.text)     # /tmp/ paths stay: config files name them too
  if full or any(f in text for f in FULL_LENGTH):
    return text
  extra = " ".join(SHORTEN.get(cmd.module, []))
  if not extra:
    return text
  if text.endswith(" & done; wait"):       # the two-host loop: each launch gets them
    return text.replace(" & done; wait", f" {extra} & done; wait")
  return f"{text} {extra}"


def run_all(scratch: str, full: bool = False, from_line: int = 0,
            lines: set[int] | None = None) -> int:
  """Run every runnable command in order in `scratch` (module doc); the
  number that failed."""
  os.makedirs(os.path.join(scratch, "tmp"), exist_ok=True)
  if not os.path.exists(os.path.join(scratch, "launch")):
    os.symlink(os.path.join(REPO, "launch"), os.path.join(scratch, "launch"))
  env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
  failed = 0
  for cmd in filter(runnable, extract()):
    if cmd.line < from_line or (lines and cmd.line not in lines):
      continue
    text = prepared(cmd, scratch, full)
    t0 = time.time()
    proc = subprocess.run(["bash", "-c", text], cwd=scratch, env=env,
                          capture_output=True, text=True)
    failed += proc.returncode != 0
    print(json.dumps({"line": cmd.line, "rc": proc.returncode,
                      "seconds": round(time.time() - t0, 1), "command": text,
                      **({"stderr_tail": proc.stderr[-800:]} if proc.returncode else {})}),
          flush=True)
  return failed


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--run", metavar="DIR", help="run the commands in this scratch dir")
  parser.add_argument("--full", action="store_true", help="with --run: do not shorten")
  parser.add_argument("--from_line", type=int, default=0,
                      help="with --run: start at this README line (earlier outputs in DIR)")
  parser.add_argument("--lines", default="",
                      help="with --run: only the commands at these README lines (comma list)")
  args = parser.parse_args()
  if args.run:
    lines = {int(n) for n in args.lines.split(",") if n.strip()}
    return min(run_all(os.path.abspath(args.run), args.full, args.from_line, lines), 1)
  for cmd in extract():
    mark = "run  " if runnable(cmd) else "skip "
    print(f"{mark}README:{cmd.line}: {cmd.text}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
