"""``bikewatch status``: running or not (exit 0 / 3), files waiting, counts, last file and error."""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest
from harness import Daemon, wait_until  # tests/ is on sys.path (conftest)

from bikewatch.cli import build_parser, main
from bikewatch.store.ledger import Ledger, Row
from bikewatch.offline.status import boot_id, identity, judge, start_ticks, summarize

UTC = dt.timezone.utc
HOST = os.uname().nodename


def iso(when: dt.datetime) -> str:
    return when.astimezone(UTC).isoformat(timespec="milliseconds")


def row(when: dt.datetime, name: str, label: str, conf: str = "0.900000", error: str = "") -> Row:
    return Row(timestamp=iso(when), source=f"/in/{name}", destination=f"/out/{label}/{name}", label=label,
               confidence=conf, p_mountain="", p_road="", sha256="", model="bikes@test", error=error,
               size_bytes="10", id=name, worker="w")


@pytest.fixture
def site(tmp_path: Path) -> dict[str, Path]:
    """A config, an inbox with waiting files (and some that are ignored), and a CSV log."""
    inbox, out = tmp_path / "inbox", tmp_path / "sorted"
    for rel in ("a.jpg", "DCIM/b.jpg", "notes.txt", "upload.jpg.part", ".hidden.jpg", ".bikewatch/work/x/claimed.jpg"):
        (inbox / rel).parent.mkdir(parents=True, exist_ok=True)
        (inbox / rel).write_bytes(b"x")
    now = dt.datetime.now(UTC)
    old = now - dt.timedelta(days=3)
    Ledger(out / "classifications.csv").append([
        row(old, "old1.jpg", "mountain"), row(old, "old2.jpg", "rejected", "", "empty file"),
        row(now - dt.timedelta(seconds=2), "new1.jpg", "road"),
        row(now - dt.timedelta(seconds=1), "broken.jpg", "rejected", "", "truncated image: 65 bytes not processed"),
        row(now, "last.jpg", "mountain", "0.612300"),
    ])
    config = tmp_path / "bw.toml"
    config.write_text(f'inbox = "{inbox}"\noutput = "{out}"\nworker_name = "w1"\n')
    return {"inbox": inbox, "out": out, "config": config, "state": inbox / ".bikewatch"}


def write_status(state: Path, pid: int, *, host: str = HOST, updated: dt.datetime | None = None,
                 ident: dict[str, object] | None = None) -> Path:
    """A status file as the service writes it; ``ident`` defaults to process ``pid``'s real identity."""
    folder = state / "status"
    folder.mkdir(parents=True, exist_ok=True)
    now = updated or dt.datetime.now(UTC)
    data = {"worker": "w1", "pid": pid, "host": host, **(identity(pid) if ident is None else ident),
            "started": iso(now - dt.timedelta(hours=1)),
            "updated": iso(now), "model": "bikes@06d8442773a2", "inbox": "", "output": "", "log": "",
            "counts": {"road": 1}, "reasons": {}, "batches": 1, "waiting": 0, "last_file": "", "last_error": "",
            "output_blocked": False, "inbox_ok": True}
    path = folder / f"w1-{pid}-abc123.json"
    path.write_text(json.dumps(data))
    return path


WAIT_ON_STDIN = "import sys; sys.stdin.read()"


def waiting_child(*args: str, cwd: Path | str | None = None) -> subprocess.Popen[bytes]:
    """A live Python child that waits on its stdin, returned once it has exec'd: until then
    its /proc/PID/cmdline is still the test process's own (which may well name bikewatch)."""
    proc = subprocess.Popen([sys.executable, "-c", WAIT_ON_STDIN, *args], stdin=subprocess.PIPE, cwd=cwd)
    wait_until(lambda: WAIT_ON_STDIN.encode() in Path(f"/proc/{proc.pid}/cmdline").read_bytes(), 10, what="exec")
    return proc


@pytest.fixture
def live_bikewatch_process() -> Iterator[subprocess.Popen[bytes]]:
    """A real live process whose command line names bikewatch (it waits on its stdin)."""
    proc = waiting_child("bikewatch")
    yield proc
    assert proc.stdin is not None
    proc.stdin.close()
    proc.wait(10)


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait(10)
    return proc.pid


def test_not_running_counts_waiting_files_and_log(site: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["status", "--config", str(site["config"])]) == 3
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0] == "bikewatch: not running"
    assert f"{site['inbox']}: 3 files waiting" in out  # a.jpg, DCIM/b.jpg, notes.txt: not .part, hidden, state
    today = next(line for line in lines if line.startswith("today"))
    total = next(line for line in lines if line.startswith("total"))
    assert "mountain 1, road 1, unsure 0, rejected 1  (3 files)" in today
    assert "mountain 2, road 1, unsure 0, rejected 2  (5 files)" in total
    assert "last.jpg -> mountain/last.jpg (0.612)" in out
    assert "broken.jpg: truncated image: 65 bytes not processed" in out


def test_stale_status_file_of_a_dead_worker(site: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    pid = dead_pid()
    write_status(site["state"], pid)
    assert main(["status", "--config", str(site["config"])]) == 3
    assert capsys.readouterr().out.splitlines()[0] == f"bikewatch: not running (stale status from pid {pid})"


def test_running_worker(site: dict[str, Path], live_bikewatch_process: subprocess.Popen[bytes],
                        capsys: pytest.CaptureFixture[str]) -> None:
    pid = live_bikewatch_process.pid
    write_status(site["state"], pid)
    (site["state"] / "status" / f".w1-{pid}-abc123.json.tmp").write_text("{half written")  # never read
    assert main(["status", "--config", str(site["config"])]) == 0
    out = capsys.readouterr().out
    assert out.startswith("bikewatch: running (1 worker)\n")
    assert f"worker w1: pid {pid} on {HOST}" in out and "model bikes@06d8442773a2" in out

    assert main(["status", "--config", str(site["config"]), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["running"] is True and info["waiting"] == 3
    assert info["total"] == {"mountain": 2, "road": 1, "rejected": 2}
    assert info["workers"][0]["pid"] == pid and info["last"]["source"] == "/in/last.jpg"


def test_killed_worker_not_yet_reaped_is_not_running(site: dict[str, Path],
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """After kill -9 the process is a zombie until its parent reaps it: it still has a pid, but is dead."""
    proc = waiting_child("bikewatch")
    try:
        write_status(site["state"], proc.pid)
        proc.kill()
        wait_until(lambda: Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z",
                   10, what="zombie")
        assert main(["status", "--config", str(site["config"])]) == 3
        assert capsys.readouterr().out.splitlines()[0] == f"bikewatch: not running (stale status from pid {proc.pid})"
    finally:
        proc.wait(10)


@pytest.fixture
def bikewatch_lookalike(tmp_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    """A live process that a name check would take for the service: its command line names
    ``/opt/bikewatch/bin/bikewatch`` and it runs in a folder called ``bikewatch``, as every
    Python started from a default clone's ``bikewatch/.venv`` does."""
    folder = tmp_path / "bikewatch"
    folder.mkdir()
    proc = waiting_child("/opt/bikewatch/bin/bikewatch", "run", cwd=folder)
    yield proc
    assert proc.stdin is not None
    proc.stdin.close()
    proc.wait(10)


def test_pid_reused_by_a_process_that_names_bikewatch_is_stale(
        site: dict[str, Path], bikewatch_lookalike: subprocess.Popen[bytes], capsys: pytest.CaptureFixture[str]) -> None:
    """A crashed worker's pid now belongs to another process whose command line and path both say
    bikewatch: it started later than the one that wrote the file, so the file is stale."""
    pid = bikewatch_lookalike.pid
    assert b"bikewatch" in Path(f"/proc/{pid}/cmdline").read_bytes()
    assert "bikewatch" in os.readlink(f"/proc/{pid}/cwd")
    now_start = start_ticks(pid)
    assert now_start is not None
    write_status(site["state"], pid, ident={"boot_id": boot_id(), "start_ticks": now_start - 100})
    assert main(["status", "--config", str(site["config"])]) == 3
    assert capsys.readouterr().out.splitlines()[0] == (
        f"bikewatch: not running (stale status from pid {pid}; that pid is now another program)")


def test_status_written_before_a_reboot_is_stale(site: dict[str, Path], live_bikewatch_process: subprocess.Popen[bytes],
                                                capsys: pytest.CaptureFixture[str]) -> None:
    """After a power cut the boot id changes; a pid and even a start time can repeat on the new boot."""
    pid = live_bikewatch_process.pid
    write_status(site["state"], pid, ident={"boot_id": "0b5e1e7e-dead-4bee-8000-000000000000",
                                            "start_ticks": start_ticks(pid)})
    assert main(["status", "--config", str(site["config"])]) == 3
    assert capsys.readouterr().out.splitlines()[0] == (
        f"bikewatch: not running (stale status from pid {pid}, written before the last reboot)")


def test_status_file_without_identity_falls_back_to_the_command_line(
        site: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    """A file from a version that wrote no identity: only the command line is left to go by.
    (Not a Python child: in a default clone sys.executable's own path names bikewatch.)"""
    other = subprocess.Popen(["cat"], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, cwd="/")
    wait_until(lambda: Path(f"/proc/{other.pid}/cmdline").read_bytes() == b"cat\0", 10, what="exec")
    try:
        write_status(site["state"], other.pid, ident={})
        assert main(["status", "--config", str(site["config"])]) == 3
        assert "that pid is now another program" in capsys.readouterr().out
    finally:
        assert other.stdin is not None
        other.stdin.close()
        other.wait(10)


def test_identity_is_this_boot_and_this_process() -> None:
    me = identity()
    assert me["boot_id"] == Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    child = waiting_child()
    try:
        theirs = start_ticks(child.pid)
        assert isinstance(me["start_ticks"], int) and isinstance(theirs, int)
        assert theirs >= me["start_ticks"]  # started after this test process
    finally:
        assert child.stdin is not None
        child.stdin.close()
        child.wait(10)
    assert start_ticks(child.pid) is None  # reaped: gone


@pytest.mark.slow
def test_live_service_is_running(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The real service's own status file says running, and stale once it is SIGKILLed."""
    daemon = Daemon(tmp_path, name="w1").start()
    try:
        config = daemon.config
        wait_until(lambda: list((daemon.inbox / ".bikewatch" / "status").glob("*.json")), 30, what="status file")
        assert main(["status", "--config", str(config)]) == 0
        out = capsys.readouterr().out
        assert out.startswith("bikewatch: running (1 worker)\n") and f"pid {daemon.proc.pid}" in out  # type: ignore[union-attr]
        pid = daemon.proc.pid  # type: ignore[union-attr]
        daemon.kill()
        assert main(["status", "--config", str(config)]) == 3
        assert capsys.readouterr().out.splitlines()[0].startswith(f"bikewatch: not running (stale status from pid {pid}")
    finally:
        daemon.stop_quietly()


def test_worker_on_another_host_judged_by_freshness() -> None:
    now = dt.datetime(2024, 5, 2, 12, 0, tzinfo=UTC)
    fresh = {"pid": 1, "host": "elsewhere", "updated": iso(now - dt.timedelta(seconds=20))}
    old = {"pid": 1, "host": "elsewhere", "updated": iso(now - dt.timedelta(hours=2))}
    running, note = judge(fresh, hostname="here", now=now)
    assert running and "on host elsewhere" in note
    running, note = judge(old, hostname="here", now=now)
    assert not running and note.startswith("stale status from pid 1 on host elsewhere")


def test_summarize_today_total_last_and_last_error() -> None:
    day = dt.datetime(2024, 5, 2, 12, 0).astimezone()  # local noon
    rows = [
        {"timestamp": iso(day - dt.timedelta(days=1)), "label": "road", "error": ""},
        {"timestamp": iso(day), "label": "rejected", "error": "empty file", "source": "/in/e.jpg"},
        {"timestamp": iso(day + dt.timedelta(minutes=1)), "label": "mountain", "error": "", "source": "/in/m.jpg"},
        {"timestamp": iso(day - dt.timedelta(minutes=5)), "label": "road", "error": ""},  # another worker, late
    ]
    s = summarize(rows, day.date())
    assert s.today == {"rejected": 1, "mountain": 1, "road": 1}
    assert s.total == {"road": 2, "rejected": 1, "mountain": 1}
    assert s.last is not None and s.last["source"] == "/in/m.jpg"
    assert s.last_error is not None and s.last_error["error"] == "empty file"


def test_bad_config_is_a_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["status", "--config", str(tmp_path / "missing.toml")]) == 2
    assert "config file not found" in capsys.readouterr().err


def test_help_documents_exit_status() -> None:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    text = sub.choices["status"].format_help()  # type: ignore[attr-defined]
    assert "0  running" in text and "3  not running" in text


@pytest.mark.slow
def test_real_daemon_running_then_stopped(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from harness import Daemon

    daemon = Daemon(tmp_path, name="statusd")
    try:
        daemon.start()
        status_dir = daemon.inbox / ".bikewatch" / "status"
        wait_until(lambda: list(status_dir.glob("statusd-*.json")), 30, what="status file")
        assert main(["status", "--config", str(daemon.config)]) == 0
        out = capsys.readouterr().out
        assert daemon.proc is not None
        assert out.startswith("bikewatch: running (1 worker)") and f"pid {daemon.proc.pid}" in out
        assert daemon.terminate() == 0
    finally:
        daemon.stop_quietly()
    assert not list(status_dir.glob("*.json"))  # removed on a clean exit
    assert main(["status", "--config", str(daemon.config)]) == 3
    assert capsys.readouterr().out.startswith("bikewatch: not running\n")


def test_reader_leaving_early_gets_no_traceback(site: dict[str, Path]) -> None:
    """`bikewatch status | head -0`: the pipe is closed before the first line is written."""
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader has already gone
    try:
        proc = subprocess.run([sys.executable, "-m", "bikewatch", "status", "--config", str(site["config"])],
                              stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=120)
    finally:
        os.close(write_end)
    assert "Traceback" not in proc.stderr, proc.stderr
    assert "BrokenPipeError" not in proc.stderr
    assert proc.returncode == 141
