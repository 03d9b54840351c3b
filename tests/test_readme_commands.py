"""The README's commands as printed: every one a fresh clone can run names a
module, flags, a config file and config fields that exist
(tests/readme_commands.py; `python tests/readme_commands.py --run DIR` runs
them all in order, by hand: bench/RESULTS.md has the last sitting)."""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

import readme_commands as rc  # noqa: E402


def test_every_runnable_readme_command_names_flags_and_config_fields_that_exist():
  commands = rc.extract()
  runnable = [c for c in commands if rc.runnable(c)]
  # the demo first, then the journeys: training, meshes, hosts, pipeline,
  # planner, export, fine-tuning, generation, long context, FP8, GRPO,
  # rejection sampling, distillation, own prompts, evaluation
  assert runnable[0].text.endswith("launch.train --config=launch/configs/default.py "
                                   "--workdir=runs/demo")
  modules = {c.module for c in runnable}
  assert {"launch.train", "launch.grpo", "launch.generate", "launch.convert", "launch.plan",
          "launch.rejection_sample", "launch.evaluate"} <= modules
  assert len(runnable) >= 20
  for c in runnable:
    assert rc.check(c) == [], (c.line, c.text)
    shortened = rc.Command(c.line, rc.prepared(c, "/scratch"))
    assert rc.check(shortened) == [], (c.line, shortened.text)


def test_the_check_finds_a_renamed_flag_field_or_file():
  bad = [rc.Command(1, "python -m launch.train --config=launch/configs/default.py "
                       "--workdir=w --config.stepz=3"),
         rc.Command(2, "python -m launch.generate --workdir=w --promt=x"),
         rc.Command(3, "python -m launch.train --config=launch/configs/nope.py --workdir=w"),
         rc.Command(4, "python -m launch.nope --x=1")]
  found = [rc.check(c) for c in bad]
  assert "--config.stepz" in found[0][0] and "--promt" in found[1][0]
  assert "no such file" in found[2][0] and "no module" in found[3][0]


def test_placeholders_and_installs_are_not_run(tmp_path):
  text = "\n".join(["    python -m launch.generate --from_hf=DIR --prompt=x", "",
                    "    pip install x && python -m pytest -q", "",
                    "    python -m launch.plan --preset=tiny"])
  path = tmp_path / "README.md"
  path.write_text("intro\n\n" + text + "\n")
  assert [rc.runnable(c) for c in rc.extract(str(path))] == [False, False, True]
