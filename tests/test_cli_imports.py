"""The CLI loads only what a command needs: building the parser, or running ``status``,
must not import TensorFlow, Keras, the service or the benchmark (a second or more each)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from bikewatch.cli import COMMANDS, build_parser

HEAVY = ("tensorflow", "keras", "bikewatch.service", "benchmarks")

PROBE = """
import json, sys
from bikewatch.cli import build_parser, main
build_parser()
after_parser = sorted(sys.modules)
rc = main(sys.argv[1:]) if len(sys.argv) > 1 else None
print(json.dumps({"after_parser": after_parser, "after_command": sorted(sys.modules), "rc": rc}))
"""


def heavy(modules: list[str]) -> list[str]:
    return [m for m in modules if any(m == h or m.startswith(h + ".") for h in HEAVY)]


def probe(*argv: str) -> dict[str, object]:
    out = subprocess.run([sys.executable, "-c", PROBE, *argv], capture_output=True, text=True, timeout=120, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_building_the_parser_imports_nothing_heavy() -> None:
    seen = probe()
    assert isinstance(seen["after_parser"], list) and "bikewatch.cli.run" in seen["after_parser"]
    assert heavy(seen["after_parser"]) == []


def test_status_runs_without_tensorflow_or_the_service(tmp_path: Path) -> None:
    config = tmp_path / "bw.toml"
    config.write_text(f'inbox = "{tmp_path / "inbox"}"\noutput = "{tmp_path / "sorted"}"\n')
    seen = probe("status", "--config", str(config), "--json")
    assert seen["rc"] == 3  # no worker runs: Exit.NOT_RUNNING
    assert isinstance(seen["after_command"], list) and "bikewatch.offline.status" in seen["after_command"]
    assert heavy(seen["after_command"]) == []


MINIMAL = {"sort": ["d", "--output", "o"], "classify": ["p.jpg"], "train": ["d", "--out", "m.keras"],
           "evaluate": ["d"], "report": ["--out", "s.html"]}


def test_every_command_module_registers_its_command() -> None:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    names = list(sub.choices or ())
    assert names == ["run", "sort", "classify", "train", "convert", "evaluate", "report", "corrections", "status"]
    assert len(names) == len(COMMANDS)
    for name in names:
        args = parser.parse_args([name, *MINIMAL.get(name, [])])
        assert args.handler.__module__ == f"bikewatch.cli.{name}"
