"""Tests for bikewatch.service.systemd against real AF_UNIX datagram sockets (no mocks).

Each test plays the role of the service manager: it binds a SOCK_DGRAM
socket, points NOTIFY_SOCKET at it, and checks the exact bytes received.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from bikewatch.service.systemd import Notifier, adapt_tensorflow_to_wx, format_status, write_execute_denied

REPO = Path(__file__).resolve().parent.parent


class Manager:
    """A fake service manager end: the receiving side of NOTIFY_SOCKET."""

    def __init__(self, sock: socket.socket, notify_socket: str) -> None:
        self.sock = sock
        self.notify_socket = notify_socket

    def recv(self) -> str:
        """Return the next datagram (fails the test after 2 s instead of hanging)."""
        self.sock.settimeout(2.0)
        return self.sock.recv(65536).decode()

    def assert_nothing_pending(self) -> None:
        self.sock.setblocking(False)
        try:
            data = self.sock.recv(65536)
        except BlockingIOError:
            return
        finally:
            self.sock.setblocking(True)
        pytest.fail(f"unexpected datagram: {data!r}")

    def env(self, **extra: str) -> dict[str, str]:
        return {"NOTIFY_SOCKET": self.notify_socket, **extra}


@pytest.fixture
def short_dir() -> Iterator[Path]:
    # sockaddr_un.sun_path is 108 bytes; pytest's tmp_path can exceed that.
    with tempfile.TemporaryDirectory(prefix="bw-") as d:
        yield Path(d)


@pytest.fixture
def fs_manager(short_dir: Path) -> Iterator[Manager]:
    path = short_dir / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    try:
        yield Manager(sock, str(path))
    finally:
        sock.close()


@pytest.fixture
def abstract_manager() -> Iterator[Manager]:
    name = f"bikewatch-test-{os.getpid()}-{uuid.uuid4().hex}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    try:
        yield Manager(sock, "@" + name)
    finally:
        sock.close()


# --------------------------------------------------------------- messages
def test_ready_plain(fs_manager: Manager) -> None:
    with Notifier.from_environ(fs_manager.env()) as n:
        assert n.enabled
        assert n.ready() is True
    assert fs_manager.recv() == "READY=1"


def test_ready_with_status_is_one_datagram(fs_manager: Manager) -> None:
    with Notifier.from_environ(fs_manager.env()) as n:
        assert n.ready(status="watching /srv/bikewatch/inbox")
    assert fs_manager.recv() == "READY=1\nSTATUS=watching /srv/bikewatch/inbox"
    fs_manager.assert_nothing_pending()


def test_status_stopping_extend_timeout_exact(fs_manager: Manager) -> None:
    with Notifier.from_environ(fs_manager.env()) as n:
        assert n.status("sorted 3")
        assert n.extend_timeout(90)
        assert n.extend_timeout(2.5)
        assert n.stopping()
    assert fs_manager.recv() == "STATUS=sorted 3"
    assert fs_manager.recv() == "EXTEND_TIMEOUT_USEC=90000000"
    assert fs_manager.recv() == "EXTEND_TIMEOUT_USEC=2500000"
    assert fs_manager.recv() == "STOPPING=1"
    fs_manager.assert_nothing_pending()


def test_status_newlines_cannot_inject_assignments(fs_manager: Manager) -> None:
    with Notifier.from_environ(fs_manager.env()) as n:
        n.status("bad\nREADY=1\r\nname")
    assert fs_manager.recv() == "STATUS=bad READY=1  name"


def test_reloading_carries_monotonic_usec(fs_manager: Manager) -> None:
    with Notifier.from_environ(fs_manager.env()) as n:
        assert n.reloading()
    assert re.fullmatch(r"RELOADING=1\nMONOTONIC_USEC=\d+", fs_manager.recv())


def test_abstract_namespace_socket(abstract_manager: Manager) -> None:
    with Notifier.from_environ(abstract_manager.env()) as n:
        assert n.enabled
        assert n.ready(status="up")
        assert n.stopping()
    assert abstract_manager.recv() == "READY=1\nSTATUS=up"
    assert abstract_manager.recv() == "STOPPING=1"


# ---------------------------------------------------------- disabled/failing
def test_no_notify_socket_is_noop() -> None:
    n = Notifier.from_environ({"WATCHDOG_USEC": "1000000"})
    assert not n.enabled
    assert n.watchdog_interval is None
    assert n.ready(status="x") is False
    assert n.status("x") is False
    assert n.stopping() is False
    assert n.extend_timeout(10) is False
    assert n.maybe_ping_watchdog(now=0.0) is False


@pytest.mark.parametrize("value", ["", "relative/notify.sock", "vsock:2:1234"])
def test_unsupported_notify_socket_is_noop(value: str) -> None:
    n = Notifier.from_environ({"NOTIFY_SOCKET": value})
    assert not n.enabled
    assert n.ready() is False


def test_missing_socket_path_returns_false_without_raising(
    short_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    n = Notifier.from_environ({"NOTIFY_SOCKET": str(short_dir / "does-not-exist.sock")})
    assert n.enabled
    with caplog.at_level(logging.DEBUG, logger="bikewatch.service.systemd"):
        assert n.ready() is False
        assert n.status("still alive") is False
        assert n.stopping() is False
    # first failure is a warning, repeats are demoted so the journal is not flooded
    levels = [r.levelno for r in caplog.records]
    assert levels == [logging.WARNING, logging.DEBUG, logging.DEBUG]


def test_recovers_after_manager_socket_reappears(short_dir: Path) -> None:
    path = short_dir / "late.sock"
    n = Notifier.from_environ({"NOTIFY_SOCKET": str(path)})
    assert n.status("early") is False
    late = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    late.bind(str(path))
    try:
        assert n.status("later") is True
        assert Manager(late, str(path)).recv() == "STATUS=later"
    finally:
        late.close()
        n.close()


# ---------------------------------------------------------------- watchdog
def test_watchdog_interval_is_half_of_watchdog_usec(fs_manager: Manager) -> None:
    n = Notifier.from_environ(fs_manager.env(WATCHDOG_USEC="60000000"))
    assert n.watchdog_interval == 30.0


def test_watchdog_ping_is_throttled(fs_manager: Manager) -> None:
    with Notifier.from_environ(fs_manager.env(WATCHDOG_USEC="10000000")) as n:
        assert n.watchdog_interval == 5.0
        assert n.maybe_ping_watchdog(now=100.0) is True  # first call always pings
        assert fs_manager.recv() == "WATCHDOG=1"
        for t in (100.0, 101.0, 104.999):
            assert n.maybe_ping_watchdog(now=t) is False
        fs_manager.assert_nothing_pending()
        assert n.maybe_ping_watchdog(now=105.0) is True
        assert fs_manager.recv() == "WATCHDOG=1"
        assert n.maybe_ping_watchdog(now=109.0) is False
        assert n.maybe_ping_watchdog(now=200.0) is True
        assert fs_manager.recv() == "WATCHDOG=1"
        fs_manager.assert_nothing_pending()


def test_watchdog_uses_monotonic_clock_by_default(fs_manager: Manager) -> None:
    with Notifier.from_environ(fs_manager.env(WATCHDOG_USEC="3600000000")) as n:
        assert n.maybe_ping_watchdog() is True
        assert n.maybe_ping_watchdog() is False  # 30 min interval not yet over
    assert fs_manager.recv() == "WATCHDOG=1"
    fs_manager.assert_nothing_pending()


def test_failed_ping_is_retried_soon_not_every_iteration(short_dir: Path) -> None:
    path = short_dir / "wd.sock"
    n = Notifier.from_environ({"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "10000000"})
    assert n.maybe_ping_watchdog(now=0.0) is False  # nobody listening yet
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    manager = Manager(sock, str(path))
    try:
        assert n.maybe_ping_watchdog(now=0.5) is False  # backing off (1 s)
        manager.assert_nothing_pending()
        assert n.maybe_ping_watchdog(now=1.0) is True  # retried long before the 5 s interval
        assert manager.recv() == "WATCHDOG=1"
        assert n.maybe_ping_watchdog(now=5.9) is False
        assert n.maybe_ping_watchdog(now=6.0) is True
        assert manager.recv() == "WATCHDOG=1"
    finally:
        sock.close()
        n.close()


def test_watchdog_pid_mismatch_disables_watchdog(fs_manager: Manager) -> None:
    env = fs_manager.env(WATCHDOG_USEC="10000000", WATCHDOG_PID=str(os.getpid() + 1))
    with Notifier.from_environ(env) as n:
        assert n.watchdog_interval is None
        assert n.maybe_ping_watchdog(now=1000.0) is False
        assert n.ready() is True  # notifications themselves still work
    assert fs_manager.recv() == "READY=1"
    fs_manager.assert_nothing_pending()


def test_watchdog_pid_match_enables_watchdog(fs_manager: Manager) -> None:
    env = fs_manager.env(WATCHDOG_USEC="10000000", WATCHDOG_PID=str(os.getpid()))
    with Notifier.from_environ(env) as n:
        assert n.watchdog_interval == 5.0
        assert n.maybe_ping_watchdog(now=0.0) is True
    assert fs_manager.recv() == "WATCHDOG=1"


@pytest.mark.parametrize("usec", ["", "0", "-5", "abc", "1.5"])
def test_invalid_watchdog_usec_disables_watchdog(fs_manager: Manager, usec: str) -> None:
    n = Notifier.from_environ(fs_manager.env(WATCHDOG_USEC=usec))
    assert n.watchdog_interval is None
    assert n.maybe_ping_watchdog(now=0.0) is False


# ---------------------------------------------------------- format_status
def test_format_status_grouped_example() -> None:
    counts: dict[str, int | dict[str, int]] = {"sorted": {"mountain": 7, "road": 5}, "rejected": 1, "waiting": 3}
    assert format_status(counts) == "sorted 12 (mountain 7, road 5), rejected 1, waiting 3"


def test_format_status_flat_and_empty() -> None:
    assert format_status({"mountain": 0, "road": 2}) == "mountain 0, road 2"
    assert format_status({}) == ""
    assert format_status({"sorted": {}}) == "sorted 0"


def test_format_status_is_single_line() -> None:
    assert "\n" not in format_status({"a\nb": 1})


# ------------------------------------------------------------ W^X detection
def test_wx_allowed_in_unrestricted_process_leaves_env_alone() -> None:
    if write_execute_denied():
        pytest.skip("this test process itself runs under W^X")
    env = {"TF_ENABLE_ONEDNN_OPTS": "1"}
    assert adapt_tensorflow_to_wx(env) is False
    assert env == {"TF_ENABLE_ONEDNN_OPTS": "1"}


_UNDER_MDWE = """
import ctypes, sys
if ctypes.CDLL(None, use_errno=True).prctl(65, 1, 0, 0, 0) != 0:  # PR_SET_MDWE, REFUSE_EXEC_GAIN
    sys.exit(77)
from bikewatch.service.systemd import adapt_tensorflow_to_wx, write_execute_denied
env = {"TF_ENABLE_ONEDNN_OPTS": "1"}
print(write_execute_denied(), adapt_tensorflow_to_wx(env), env["TF_ENABLE_ONEDNN_OPTS"])
"""


def test_wx_denied_under_kernel_mdwe_forces_onednn_off() -> None:
    # prctl(PR_SET_MDWE) (Linux >= 6.3) is what systemd >= 254 uses for
    # MemoryDenyWriteExecute=yes; run it in a child so this process is unaffected.
    proc = subprocess.run(
        [sys.executable, "-c", _UNDER_MDWE],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    if proc.returncode == 77:
        pytest.skip("kernel has no PR_SET_MDWE (Linux < 6.3)")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["True", "True", "0"]
