"""Every command the README and the docs show parses as written: its flags exist, each
``--set KEY=VALUE`` names a key of that command's config, and the files it names exist.

The commands are not run here (most are real-scale: a 32-trial search, a 500-step evaluation);
the demo's test runs the whole chain at small scale. This catches the drift that makes a
documented command fail on its first line: a renamed flag, a retired config key, a moved file.
"""

from __future__ import annotations

import dataclasses
import re
import shlex
from pathlib import Path

import pytest

from adps.cli import build_parser
from adps.data.preprocess import PrepareConfig
from adps.orchestration.evaluate import EvaluateConfig
from adps.orchestration.fid import FidConfig
from adps.orchestration.study_images import ImageEvaluateConfig
from adps.orchestration.train_config import TrainConfig
from adps.orchestration.tune_config import SearchConfig

ROOT = Path(__file__).resolve().parents[1]
DOCS = ["README.md", *sorted(f"docs/{p.name}" for p in (ROOT / "docs").glob("*.md"))]
CONFIGS = {"prepare": PrepareConfig, "train": TrainConfig, "sweep": TrainConfig, "evaluate": EvaluateConfig,
           "fid": FidConfig, "tune": SearchConfig}
# The flags whose value is a file or folder of this repository.
PATH_FLAGS = ("--config", "--configs", "--space")


def _job_commands() -> dict[str, str]:
    """``jobs/<script>.py`` -> the ``adps`` command it runs."""
    found = {}
    for script in (ROOT / "jobs").glob("*.py"):
        match = re.search(r'main\(\["(\w[\w-]*)"', script.read_text())
        if match:
            found[f"jobs/{script.name}"] = match.group(1)
    return found


def documented_commands() -> list[tuple[str, str]]:
    """``(document, command line)`` for every ``adps ...`` line and every ``ray job submit ...
    -- python jobs/<script>.py ...`` line of the documents' code blocks (continuations joined,
    trailing comments dropped)."""
    commands = []
    for doc in DOCS:
        in_block = False
        pending = ""
        for line in (ROOT / doc).read_text().splitlines():
            if line.lstrip().startswith("```"):
                in_block, pending = not in_block, ""
                continue
            if not in_block:
                continue
            line = re.sub(r"\s+#\s.*$", "", line.strip())
            if pending:
                line = pending + " " + line
                pending = ""
            if line.endswith("\\"):
                pending = line[:-1].strip()
                continue
            if re.match(r"adps [\w-]+:", line):  # a program's output ("adps evaluate: ..."), not a command
                continue
            if line.startswith("adps ") or (line.startswith("ray job submit") and " -- python jobs/" in line):
                commands.append((doc, line))
    return commands


def _argv(line: str) -> list[str]:
    """The ``adps`` arguments a documented line amounts to."""
    words = shlex.split(line, posix=True)
    if words[0] == "adps":
        return words[1:]
    script_at = words.index("python") + 1
    command = _job_commands()[words[script_at]]
    return [command, *words[script_at + 1:]]


def test_the_documents_show_commands() -> None:
    found = documented_commands()
    assert len(found) > 20, found  # the pattern is not broken
    assert {doc for doc, _ in found} >= {"README.md", "docs/training.md", "docs/evaluation.md", "docs/tuning.md"}
    assert set(_job_commands().values()) >= {"prepare", "train", "sweep", "evaluate", "fid", "tune", "demo"}


@pytest.mark.parametrize(("doc", "line"), documented_commands(), ids=lambda value: value[:60])
def test_documented_command_parses(doc: str, line: str) -> None:
    argv = _argv(line)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit:
        pytest.fail(f"{doc}: `{line}` does not parse (adps {' '.join(argv)})")
    config_class = CONFIGS.get(args.command)
    if args.command == "evaluate" and getattr(args, "study", "mri") == "images":
        config_class = ImageEvaluateConfig
    if config_class is not None:
        keys = {field.name for field in dataclasses.fields(config_class)}
        for item in getattr(args, "set", None) or []:
            key = item.split("=", 1)[0]
            assert key in keys, f"{doc}: `{line}` sets {key!r}, which {config_class.__name__} does not have"
    for flag in PATH_FLAGS:
        value = getattr(args, flag.lstrip("-").replace("-", "_"), None)
        if value and not str(value).startswith(("s3://", "my_", "THIS")) and "/" in str(value):
            assert (ROOT / value).exists(), f"{doc}: `{line}` names {value}, which does not exist"


def test_the_check_catches_a_retired_key_a_wrong_flag_and_a_missing_file() -> None:
    with pytest.raises(AssertionError, match="sets 'lr_rampup_images'"):
        test_documented_command_parses("x.md", "adps train --config configs/ambient_r4.yaml --set lr_rampup_images=1")
    with pytest.raises(pytest.fail.Exception, match="does not parse"):
        test_documented_command_parses("x.md", "adps tune --model models:/m@latest --r_inf 8")
    with pytest.raises(AssertionError, match="tune_spaces/nope.yaml, which does not exist"):
        test_documented_command_parses("x.md", "adps tune --model models:/m@latest --space tune_spaces/nope.yaml")
    with pytest.raises(AssertionError, match="ImageEvaluateConfig does not have"):
        test_documented_command_parses("x.md", "adps evaluate --study images --set r_inf=2,4")
