"""Failover over a real network filesystem: sshfs from a private sshd on 127.0.0.1.

Host A works on the server's own paths, host B on the sshfs mount of them, each with its
own host name (a UTS namespace), ``worker_name`` and CSV, as the README recommends. sshfs
shares no locks between the two, its ``renameat2`` lacks RENAME_NOREPLACE, and B sees A's
paths under another prefix: what the CSV-follows-the-journal and the takeover rename are for.

Needs root, ``/dev/fuse``, sshfs and openssh-server (``apt-get install sshfs
openssh-server``); skips with the reason otherwise.
"""

from __future__ import annotations

import collections
import os
import shutil
import socket
import subprocess
from pathlib import Path

import pytest

from harness import Daemon, read_csv, wait_until
from photos import check_nothing_lost, hash_multiset, move_in, photo_bytes, work_leftovers, write_photos
from test_failover import FAST, STALE, dead_worker, hashes, on_host, uts_available

SSHD = "/usr/sbin/sshd"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class View:
    """The share's folders as one host sees them (the server's paths, or the mount's)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.inbox, self.output = root / "inbox", root / "sorted"
        self.work_root = self.inbox / ".bikewatch" / "work"

    def csv(self, host: str) -> Path:
        return self.root / f"{host}.csv"

    def rows(self) -> list[dict[str, str]]:
        return [r for p in sorted(self.root.glob("*.csv")) for r in read_csv(p)]


@pytest.fixture
def share(tmp_path: Path):
    """(server view, mount view) of one share; skips when sshfs over a private sshd cannot be set up."""
    missing = [p for p in ("sshfs", "ssh-keygen", "fusermount") if shutil.which(p) is None]
    if missing or not os.path.exists(SSHD):
        pytest.skip(f"sshfs test needs sshfs and openssh-server installed (missing: {missing or [SSHD]})")
    if not os.path.exists("/dev/fuse") or os.geteuid() != 0:
        pytest.skip("sshfs test needs root and /dev/fuse")
    why = uts_available()
    if why:
        pytest.skip(why)
    keys = tmp_path / "ssh"
    keys.mkdir(mode=0o700)
    for name in ("host", "client"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(keys / name)], check=True)
    shutil.copy(keys / "client.pub", keys / "authorized_keys")
    port = _free_port()
    (keys / "sshd_config").write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {keys / 'host'}\n"
        f"AuthorizedKeysFile {keys / 'authorized_keys'}\nPermitRootLogin prohibit-password\n"
        "PasswordAuthentication no\nKbdInteractiveAuthentication no\nStrictModes no\nUsePAM no\n"
        f"Subsystem sftp internal-sftp\nPidFile {keys / 'sshd.pid'}\n")
    os.makedirs("/run/sshd", exist_ok=True)  # sshd's privilege separation folder
    sshd = subprocess.Popen([SSHD, "-D", "-e", "-f", str(keys / "sshd_config")], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    server, mnt = tmp_path / "server", tmp_path / "mnt"
    for p in (server / "inbox", server / "sorted", mnt):
        p.mkdir(parents=True)
    mounted = False
    try:
        def listening() -> bool:
            if sshd.poll() is not None:
                pytest.skip(f"private sshd did not start: {sshd.stderr.read().decode(errors='replace')[-300:]}")
            with socket.socket() as s:
                return s.connect_ex(("127.0.0.1", port)) == 0

        wait_until(listening, 15, what="sshd listening")
        opts = (f"IdentityFile={keys / 'client'},Port={port},StrictHostKeyChecking=no,"
                "UserKnownHostsFile=/dev/null,BatchMode=yes,dir_cache=no")
        res = subprocess.run(["sshfs", "-o", opts, f"root@127.0.0.1:{server}", str(mnt)], capture_output=True,
                             text=True, timeout=30)
        if res.returncode != 0:
            pytest.skip(f"cannot mount sshfs: {res.stderr.strip()[-300:]}")
        mounted = True
        yield View(server), View(mnt)
    finally:
        if mounted:
            if subprocess.run(["fusermount", "-u", str(mnt)], capture_output=True).returncode != 0:
                subprocess.run(["umount", "-l", str(mnt)], capture_output=True)
        sshd.terminate()
        sshd.wait(10)


def _as_server(rows: list[dict[str, str]], server: View, mnt: View) -> list[dict[str, str]]:
    """Rows as the server sees them: host B wrote its paths under the mount."""
    return [{k: v.replace(str(mnt.root), str(server.root)) for k, v in r.items()} for r in rows]


def _daemon(tmp_path: Path, view: View, host: str, daemons: list[Daemon], **extra: object) -> Daemon:
    # Config and notify socket stay local (an AF_UNIX socket cannot live on sshfs).
    d = Daemon(tmp_path, name=host, inbox=view.inbox, output=view.output, wrap=on_host(host),
               settings={**FAST, "log": str(view.csv(host)), "stale_worker_seconds": STALE,
                         "poll_interval_seconds": 0.5, **extra})
    daemons.append(d)
    return d


def test_the_mount_host_dies_after_its_csv_fsync_and_the_server_host_finishes_once(
        tmp_path: Path, share: tuple[View, View], daemons: list[Daemon]) -> None:
    """The issue's case over sshfs: 32 rows fsynced to b.csv through the mount, journal left."""
    server, mnt = share
    mnt.work_root.mkdir(parents=True)
    (mnt.output / "road").mkdir()
    photos = {f"B{i:02d}.jpg": photo_bytes(700 + i) for i in range(32)}
    folder, items = dead_worker(mnt, host="host-b", name="bravo", photos=photos, stage="recorded")
    assert len(read_csv(server.csv("host-b"))) == 32
    a = _daemon(tmp_path, server, "host-a", daemons).start()
    wait_until(lambda: a.events("recovered work of a stopped worker"), 60, what="bravo's folder recovered")
    (event,) = a.events("recovered work of a stopped worker")
    assert event["csv"] == [str(server.csv("host-b"))], event
    assert a.terminate() == 0
    assert not (server.work_root / folder.name).exists()
    rows_b = read_csv(server.csv("host-b"))
    assert sorted(r["id"] for r in rows_b) == sorted(it.key for it in items)
    assert read_csv(server.csv("host-a")) == []
    check_nothing_lost(hashes(photos), server.inbox, server.output, _as_server(server.rows(), server, mnt))


def test_a_daemon_on_the_mount_killed_mid_dump_is_finished_by_the_server_host(
        tmp_path: Path, share: tuple[View, View], daemons: list[Daemon]) -> None:
    server, mnt = share
    b = _daemon(tmp_path, mnt, "host-b", daemons, max_batch=8).start()
    assert b.events("watching inbox")[0]["fstype"] == "fuse.sshfs"
    stage = server.root / ".stage"
    write_photos(stage, 150)
    inputs = hash_multiset(stage.iterdir())
    move_in(stage, server.inbox)
    wait_until(lambda: len(read_csv(server.csv("host-b"))) >= 24, 120, interval=0.01, what="bravo's first rows")
    b.kill()
    a = _daemon(tmp_path, server, "host-a", daemons, max_batch=8).start()
    wait_until(lambda: len(server.rows()) >= 150 and not any(server.inbox.glob("*.jpg")), 180, interval=0.2,
               what="150 rows")
    wait_until(lambda: not work_leftovers(server.inbox), 30, what="bravo's folder recovered")
    assert a.terminate(30) == 0
    rows = _as_server(server.rows(), server, mnt)
    places = check_nothing_lost(inputs, server.inbox, server.output, rows)
    assert places["inbox"] == 0 and len(rows) == 150
    assert max(collections.Counter(r["id"] for r in rows).values()) == 1
    assert {r["worker"] for r in read_csv(server.csv("host-a"))} <= {"host-a"}, "bravo's batch in alpha's CSV"
    print("rows per CSV:", {h: len(read_csv(server.csv(h))) for h in ("host-a", "host-b")},
          "recovered:", [(e["delivered"], e["returned"]) for e in a.events("recovered work of a stopped worker")])
