"""Static checks of systemd/bikewatch.service (and the GPU drop-in) with systemd-analyze.

Why the detour through a fake root: a plain ``systemd-analyze verify`` on a
machine without the install fails with "Command /opt/bikewatch/.venv/bin/
bikewatch is not executable", and ``--man=no`` does not help with that. With
``--root=DIR`` every path is resolved inside DIR, so we build a tiny root with
stub executables for the Exec*= binaries plus a copy of the distribution's
unit directory (for sysinit.target & co.). Also, ``verify`` exits 0 even for
unknown keys or unparsable values (it only logs "…, ignoring"), so the test
insists on empty output, not just the exit status.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
UNIT = REPO / "systemd" / "bikewatch.service"
GPU_DROPIN = REPO / "systemd" / "gpu-access.conf"
MAX_EXPOSURE = 2.0

ANALYZE = shutil.which("systemd-analyze")
pytestmark = pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze not installed (no systemd here)")

_SYSTEM_UNIT_DIRS = ("/usr/lib/systemd/system", "/lib/systemd/system")
_EXEC_RE = re.compile(r"^Exec[A-Za-z]*=\s*[-@:+!]*(/\S+)", re.MULTILINE)


def _analyze(*args: str) -> subprocess.CompletedProcess[str]:
    assert ANALYZE is not None
    return subprocess.run([ANALYZE, *args], capture_output=True, text=True, timeout=60)


def _fake_root(tmp: Path, *, dropins: tuple[Path, ...] = ()) -> Path:
    """A root containing the unit (+ drop-ins), stub Exec binaries and the system unit dir."""
    units = next((Path(d) for d in _SYSTEM_UNIT_DIRS if (Path(d) / "sysinit.target").exists()), None)
    if units is None:
        pytest.skip("no systemd system unit directory with sysinit.target found")
    root = tmp / "root"
    etc = root / "etc/systemd/system"
    etc.mkdir(parents=True)
    shutil.copy(UNIT, etc / UNIT.name)
    texts = [UNIT.read_text()]
    if dropins:
        ddir = etc / f"{UNIT.name}.d"
        ddir.mkdir()
        for d in dropins:
            shutil.copy(d, ddir / d.name)
            texts.append(d.read_text())
    for text in texts:
        for binary in _EXEC_RE.findall(text):
            stub = root / binary.lstrip("/")
            stub.parent.mkdir(parents=True, exist_ok=True)
            stub.write_text("#!/bin/sh\nexit 0\n")
            stub.chmod(0o755)
    shutil.copytree(units, root / units.relative_to("/"), symlinks=True)
    return root


def _exposure(output: str) -> float:
    match = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", output)
    assert match, f"no exposure score in output:\n{output}"
    return float(match.group(1))


def test_verify_is_clean(tmp_path: Path) -> None:
    root = _fake_root(tmp_path)
    proc = _analyze("verify", f"--root={root}", "--man=no", UNIT.name)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (proc.stdout + proc.stderr).strip() == "", proc.stdout + proc.stderr


def test_verify_with_gpu_dropin_is_clean(tmp_path: Path) -> None:
    root = _fake_root(tmp_path, dropins=(GPU_DROPIN,))
    proc = _analyze("verify", f"--root={root}", "--man=no", UNIT.name)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (proc.stdout + proc.stderr).strip() == "", proc.stdout + proc.stderr


def test_verify_output_check_catches_mistakes(tmp_path: Path) -> None:
    """Guard for the guard: a bad line must produce output even though rc stays 0."""
    root = _fake_root(tmp_path)
    unit = root / "etc/systemd/system" / UNIT.name
    unit.write_text(unit.read_text().replace("[Service]\n", "[Service]\nWatchdogSec=sixty\n", 1))
    proc = _analyze("verify", f"--root={root}", "--man=no", UNIT.name)
    assert "WatchdogSec" in proc.stdout + proc.stderr or "sixty" in proc.stdout + proc.stderr


def test_security_exposure_at_most_2() -> None:
    proc = _analyze("security", "--offline=true", str(UNIT))
    assert proc.returncode == 0, proc.stderr
    assert _exposure(proc.stdout + proc.stderr) <= MAX_EXPOSURE


def test_security_exposure_with_gpu_dropin_at_most_2(tmp_path: Path) -> None:
    root = _fake_root(tmp_path, dropins=(GPU_DROPIN,))
    proc = _analyze("security", "--offline=true", f"--root={root}", UNIT.name)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout + proc.stderr
    assert "char-nvidia-uvm" in out, "drop-in was not applied"
    assert _exposure(out) <= MAX_EXPOSURE


def test_unit_keeps_tensorflow_compatible_settings() -> None:
    """W^X stays on; LiteRT needs no TF_ENABLE_ONEDNN_OPTS=0 (the daemon sets it itself if TF is loaded)."""
    text = UNIT.read_text()
    settings = dict(
        (k.strip(), v.strip())
        for k, v in (line.split("=", 1) for line in text.splitlines() if "=" in line and not line.startswith("#"))
        if k.strip() in {"Type", "NotifyAccess", "WatchdogSec", "MemoryDenyWriteExecute"}
    )
    assert settings == {
        "Type": "notify",
        "NotifyAccess": "main",
        "WatchdogSec": "60",
        "MemoryDenyWriteExecute": "yes",
    }
    assert "TF_ENABLE_ONEDNN_OPTS" not in "".join(line for line in text.splitlines() if not line.startswith("#"))
    memory_max = re.search(r"^MemoryMax=(\d+)([MG])$", text, re.MULTILINE)
    assert memory_max, "MemoryMax= must be set (a decompression bomb must not take the host down)"
    assert int(memory_max.group(1)) * {"M": 1, "G": 1024}[memory_max.group(2)] <= 1024, "LiteRT needs < 1 GiB"
    assert re.search(r"^SystemCallFilter=mbind$", text, re.MULTILINE), "numpy's OpenBLAS needs mbind"
    assert re.search(r"^SystemCallFilter=setpriority$", text, re.MULTILINE), "decode workers lower their priority"
