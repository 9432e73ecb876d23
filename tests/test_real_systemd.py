"""The shipped unit under a real systemd as PID 1, installed as the README says.

``test_unit_file.py`` checks the unit statically; this boots a container with
systemd-nspawn and runs ``systemd/bikewatch.service`` for real: ``Type=notify``
start-up, the sandbox (W^X, no capabilities, ``PrivateUsers=``...), a camera
dump sorted by the service, ``systemctl reload`` (SIGHUP) and ``systemctl stop``.

How, and why this way:

* The container's root is a throw-away overlayfs of the host's ``/`` (so it has
  this machine's systemd and Python), its upper layer on a tmpfs, mounted in a
  private mount namespace (``unshare -m``): when the namespace's last process
  exits the mounts are gone, whatever happened, and nothing is written to ``/``.
  ``/run`` gets a tmpfs there too: nspawn keeps per-machine state in
  ``/run/systemd/nspawn`` and will not remove it from a disk file system itself.
* ``--register=no --keep-unit`` because the host is not run by systemd (no
  machined); ``SYSTEMD_NSPAWN_UNIFIED_HIERARCHY=1`` for a cgroup2-only container.
  The container is driven by ``nsenter`` into its PID 1's namespaces.
* It boots ``basic.target`` only: the host's own services (sshd, databases) in
  the copied ``/`` are not started.
* ``/srv/bikewatch`` is a host folder bound in (like the NFS/SMB share the unit
  expects there), so the test drops photos and checks results from outside.
* The install follows README's "Install as a systemd service" word for word:
  user/group 850, ``python3 -m venv /opt/bikewatch/.venv`` with the
  distribution's Python and ``pip install`` of (a copy of) this checkout,
  ``/etc/bikewatch/bikewatch.toml`` from ``config/`` with the ``var/`` paths
  removed, the data folders, the unit, ``daemon-reload``.

Skips (with the reason) when not root, without systemd-nspawn/nsenter/unshare,
without overlayfs, or when the container does not boot (an environment matter,
not bikewatch's). The figures printed (start-up, memory, photos/s) are
information only: this machine is shared, nothing is asserted on them.
"""

from __future__ import annotations

import collections
import contextlib
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Iterator

import pytest

from harness import read_csv, wait_until
from photos import broken_bytes, check_nothing_lost, photo_bytes, sha256_file

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

REPO = Path(__file__).resolve().parent.parent
UNIT = "bikewatch.service"
SRV = "/srv/bikewatch"  # the unit's ReadWritePaths= and the config's defaults
PHOTOS = 300
MAX_EXPOSURE = 1.0
SYS_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

# Runs as the only process of a new private mount namespace (unshare -m): the mounts live and
# die with it, and it execs systemd-nspawn, so the container's lifetime is this process's.
BOOT_SCRIPT = r"""
set -eu
T=$1; SRVDIR=$2; SRC=$3; NAME=$4
mount -t tmpfs -o mode=0755 bikewatch-layer "$T/layer"
mkdir "$T/layer/upper" "$T/layer/work"
mount -t overlay overlay -o "lowerdir=/,upperdir=$T/layer/upper,workdir=$T/layer/work" "$T/root"
mount -t tmpfs -o mode=0755 bikewatch-nspawn-run /run
# A cgroup of its own in the host's cgroup2 tree, so that two containers (two suites at once)
# never share one: with --keep-unit nspawn puts the container in the cgroup it was started in.
if [ -n "${CG:-}" ] && mkdir "$CG" 2>/dev/null; then echo $$ > "$CG/cgroup.procs"; fi
export SYSTEMD_NSPAWN_UNIFIED_HIERARCHY=1
exec systemd-nspawn --quiet -D "$T/root" --boot --register=no --keep-unit --machine="$NAME" \
    --console=pipe --bind="$SRVDIR:/srv/bikewatch" --bind="$SRC:/root/bikewatch-src" \
    systemd.unit=basic.target
"""

# README.md, "Install as a systemd service" (run in the source folder, as root). The container is
# a copy of this host: should bikewatch be installed here already, its copy is replaced (and its
# drop-ins removed), so the test always runs this checkout with the shipped unit alone.
INSTALL_SCRIPT = r"""
set -eu
cd /root/bikewatch-src
getent group bikewatch > /dev/null || groupadd --system --gid 850 bikewatch
id bikewatch > /dev/null 2>&1 || useradd --system --uid 850 --gid bikewatch --home-dir /var/lib/bikewatch \
        --no-create-home --shell /usr/sbin/nologin bikewatch
test "$(id -u bikewatch):$(id -g bikewatch)" = 850:850
rm -rf /opt/bikewatch/.venv /etc/systemd/system/bikewatch.service.d
python3 -m venv /opt/bikewatch/.venv
/opt/bikewatch/.venv/bin/pip install --quiet --disable-pip-version-check . 2>&1 | grep -v 'is ignored' || true
/opt/bikewatch/.venv/bin/bikewatch --help > /dev/null
install -d -m 0755 /etc/bikewatch && install -m 0640 -g bikewatch config/bikewatch.toml /etc/bikewatch/
sed -i '/^inbox = /d; /^output = /d' /etc/bikewatch/bikewatch.toml
install -d -o bikewatch -g bikewatch -m 2770 /srv/bikewatch /srv/bikewatch/inbox /srv/bikewatch/sorted
install -m 0644 systemd/bikewatch.service /etc/systemd/system/ && systemctl daemon-reload
systemctl enable bikewatch
"""

# Asks the kernel for one writable+executable mapping: under MemoryDenyWriteExecute=yes it must fail.
WX_PROBE = """\
import mmap
try:
    mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    print("wx-probe: allowed", flush=True)
except OSError as exc:
    print("wx-probe: refused", exc.errno, flush=True)
"""
# A copy of the installed unit, sandbox and all, that runs WX_PROBE instead of the daemon; then
# the same with only MemoryDenyWriteExecute=no added in a drop-in (the control: the probe can tell).
PROBE_UNIT = "bikewatch-wxprobe.service"
PROBE_SCRIPT = r"""
set -eu
cd /etc/systemd/system
sed -e 's|^ExecStart=.*|ExecStart=/opt/bikewatch/.venv/bin/python3 /srv/bikewatch/wxprobe.py|' \
    -e 's|^Type=notify$|Type=oneshot|' bikewatch.service > bikewatch-wxprobe.service
grep -qx 'ExecStart=/opt/bikewatch/.venv/bin/python3 /srv/bikewatch/wxprobe.py' bikewatch-wxprobe.service
grep -qx 'Type=oneshot' bikewatch-wxprobe.service
systemctl daemon-reload
systemctl start bikewatch-wxprobe.service
mkdir bikewatch-wxprobe.service.d
printf '[Service]\nMemoryDenyWriteExecute=no\n' > bikewatch-wxprobe.service.d/open.conf
systemctl daemon-reload
systemctl start bikewatch-wxprobe.service
rm -r bikewatch-wxprobe.service bikewatch-wxprobe.service.d
systemctl daemon-reload
"""


def _why_not() -> str | None:
    if os.geteuid() != 0:
        return "needs root (mounts an overlay and boots a container)"
    for tool in ("systemd-nspawn", "nsenter", "unshare"):
        if shutil.which(tool) is None:
            hint = " (apt-get install -y systemd-container)" if tool == "systemd-nspawn" else ""
            return f"{tool} not installed{hint}"
    try:
        if "overlay" not in Path("/proc/filesystems").read_text():
            return "this kernel has no overlayfs (needed for a throw-away copy of /)"
    except OSError as exc:
        return f"cannot read /proc/filesystems: {exc}"
    if not Path("/usr/bin/python3").exists():
        return "no distribution python3 at /usr/bin/python3 for /opt/bikewatch/.venv"
    return None


_WHY_NOT = _why_not()
if _WHY_NOT is not None:
    pytestmark = [*pytestmark, pytest.mark.skip(reason=_WHY_NOT)]


class Machine:
    """A booted throw-away container and the commands run inside it."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.srv = base / "srv"  # /srv/bikewatch inside
        self.src = base / "src"  # /root/bikewatch-src inside
        self.name = f"bikewatch-test-{os.getpid()}"
        unified = next((p for p in (Path("/sys/fs/cgroup/unified"), Path("/sys/fs/cgroup"))
                        if (p / "cgroup.procs").exists() and (p / "cgroup.subtree_control").exists()), None)
        self.cgroup = unified / self.name if unified is not None else None  # see BOOT_SCRIPT
        self.log_path = base / "nspawn.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.leader = 0  # the container's PID 1, as the host sees it
        self.mnt_ns = ""  # the private mount namespace holding the overlay
        self.figures: dict[str, str] = {}

    # ----- lifecycle ---------------------------------------------------------------------

    def boot(self, timeout: float = 90.0) -> None:
        for d in ("layer", "root", "srv", "src"):
            (self.base / d).mkdir()
        _copy_source(self.src)
        started = time.monotonic()
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                ["unshare", "-m", "--propagation", "private", "bash", "-c", BOOT_SCRIPT, "boot",
                 str(self.base), str(self.srv), str(self.src), self.name],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                env={**os.environ, "CG": str(self.cgroup or "")})
        try:
            self.leader = wait_until(self._find_leader, timeout=30, interval=0.05,
                                     what="the container's systemd to start")
        except AssertionError:
            self._skip_boot("systemd-nspawn did not start a container")
        deadline = time.monotonic() + timeout
        state = ""
        while time.monotonic() < deadline:  # fails at once while PID 1's private socket is not up yet
            done = self.sh("systemctl is-system-running --wait", check=False, timeout=timeout)
            state = done.stdout.strip() or done.stderr.strip()
            if state in ("running", "degraded"):
                break
            time.sleep(0.1)
        if state not in ("running", "degraded"):
            failed = self.sh("systemctl --failed --no-legend --plain", check=False).stdout
            self._skip_boot(f"the container did not finish booting (state {state!r}; failed units: {failed!r})")
        self.figures["boot"] = f"{time.monotonic() - started:.1f} s (nspawn -> is-system-running {state})"

    def _find_leader(self) -> int:
        assert self.proc is not None
        if self.proc.poll() is not None:
            self._skip_boot(f"systemd-nspawn exited with {self.proc.returncode}")
        for pid in _children(self.proc.pid):
            try:
                if Path(f"/proc/{pid}/comm").read_text().strip() != "systemd":
                    continue
                # nspawn runs (the container started) only after unshare made the private namespace
                ns = os.readlink(f"/proc/{self.proc.pid}/ns/mnt")
            except OSError:
                continue
            if ns != os.readlink("/proc/self/ns/mnt"):
                self.mnt_ns = ns
                return pid
        return 0

    def _skip_boot(self, why: str) -> None:
        tail = self.log_path.read_text(errors="replace")[-1500:] if self.log_path.exists() else ""
        self.close()
        pytest.skip(f"cannot boot a systemd container here ({why}); nspawn said: {tail.strip()!r}")

    def close(self) -> None:
        """Power the container off (kill it if it will not go) and check no mount is left."""
        proc = self.proc
        if proc is None:
            return
        self.proc = None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)  # --boot: nspawn asks PID 1 to power off (SIGRTMIN+3)
            try:
                proc.wait(timeout=45)
            except subprocess.TimeoutExpired:
                if self.leader:
                    _kill(self.leader)  # PID 1 gone: the kernel kills the whole container
                _kill(proc.pid, signal.SIGTERM)  # a second SIGTERM: nspawn stops at once
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    _kill(proc.pid)
                    proc.wait(timeout=15)
        if self.mnt_ns:  # the overlay lives exactly as long as a process in that namespace does
            wait_until(lambda: not _in_namespace(self.mnt_ns), timeout=15,
                       what=f"the last process of the overlay's mount namespace {self.mnt_ns} to exit")
        if self.cgroup is not None and self.cgroup.is_dir():  # empty now: remove it, deepest first
            for sub in sorted((d for d in self.cgroup.rglob("*") if d.is_dir()), key=lambda d: -len(d.parts)):
                with contextlib.suppress(OSError):
                    sub.rmdir()
            with contextlib.suppress(OSError):
                self.cgroup.rmdir()

    # ----- commands inside ---------------------------------------------------------------

    def sh(self, script: str, *, check: bool = True, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        """Run ``script`` with sh as root inside the container, with a clean environment."""
        keep = {k: v for k, v in os.environ.items() if k.startswith("PIP_") or k.lower().endswith("_proxy")}
        env = ["env", "-i", f"PATH={SYS_PATH}", "HOME=/root", "LANG=C.UTF-8",
               *(f"{k}={v}" for k, v in keep.items())]
        done = subprocess.run(
            ["nsenter", "-t", str(self.leader), "-m", "-u", "-i", "-n", "-p", "-C", "--", *env, "sh", "-c", script],
            capture_output=True, text=True, timeout=timeout)
        if check and done.returncode != 0:
            raise AssertionError(f"in the container, `{script.strip()[:200]}` exited {done.returncode}:\n"
                                 f"{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
        return done

    def show(self, *props: str) -> dict[str, str]:
        out = self.sh(f"systemctl show {UNIT} " + " ".join(f"-p {p}" for p in props)).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def unit_pids(self) -> list[int]:
        out = self.sh(f"cat /sys/fs/cgroup/system.slice/{UNIT}/cgroup.procs", check=False).stdout
        return [int(p) for p in out.split()]

    def journal(self, unit: str = UNIT) -> str:
        return self.sh(f"journalctl -u {unit} -o cat --no-pager", check=False).stdout

    def host_path(self, inside: str) -> Path:
        """Where a path under /srv/bikewatch in the container is on the host."""
        assert inside.startswith(SRV + "/"), inside
        return self.srv / inside[len(SRV) + 1:]


def _copy_source(dest: Path) -> None:
    """What `pip install /path/to/checkout` needs, copied: pip builds in the tree, never in ours."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "build")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, dest / name)
    for name in ("bikewatch", "config", "systemd"):
        shutil.copytree(REPO / name, dest / name, ignore=ignore)


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


def _in_namespace(ns: str) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.readlink(f"/proc/{entry}/ns/mnt") == ns:
                    pids.append(int(entry))
            except OSError:
                pass
    return pids


def _kill(pid: int, sig: int = signal.SIGKILL) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


@pytest.fixture(scope="module")
def machine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Machine]:
    """A booted container with bikewatch installed as the README says (not yet started)."""
    m = Machine(tmp_path_factory.mktemp("nspawn"))
    try:
        m.boot()
        started = time.monotonic()
        done = m.sh(INSTALL_SCRIPT, check=False, timeout=300)
        if done.returncode != 0:
            text = done.stdout + done.stderr
            if re.search(r"name resolution|No matching distribution|Could not find a version|NewConnectionError",
                         text):
                pytest.skip(f"pip cannot reach a package index from here to install the service: {text[-600:]!r}")
            raise AssertionError(f"the README's install failed ({done.returncode}):\n{text[-3000:]}")
        m.figures["install"] = f"{time.monotonic() - started:.1f} s (venv + pip install + unit)"
        yield m
    finally:
        m.close()
        shutil.rmtree(m.base, ignore_errors=True)


def _state(m: Machine) -> str:
    return m.show("ActiveState")["ActiveState"]


def test_service_lifecycle_under_real_systemd(machine: Machine) -> None:
    """start -> READY, a dump sorted exactly once, W^X in force, no TensorFlow, reload, clean stop."""
    m = machine

    # --- start: Type=notify, so "active" means the daemon sent READY=1 -----------------------
    started = time.monotonic()
    m.sh(f"systemctl start --no-block {UNIT}")
    state = wait_until(lambda: (s := _state(m)) in ("active", "failed") and s, timeout=120, interval=0.1,
                       what="bikewatch.service to become active")
    assert state == "active", f"the service failed to start:\n{m.journal()[-3000:]}"
    wall = time.monotonic() - started
    p = m.show("MainPID", "NRestarts", "InactiveExitTimestampMonotonic", "ActiveEnterTimestampMonotonic",
               "MemoryDenyWriteExecute", "StatusText")
    main_pid = int(p["MainPID"])
    assert main_pid > 0 and p["NRestarts"] == "0", p
    ready_s = (int(p["ActiveEnterTimestampMonotonic"]) - int(p["InactiveExitTimestampMonotonic"])) / 1e6
    m.figures["start-up"] = f"{ready_s:.2f} s exec -> READY=1 (systemd's timestamps); {wall:.2f} s as polled"

    # --- W^X: the unit's setting is in effect, and it does refuse W+X memory here -------------
    assert p["MemoryDenyWriteExecute"] == "yes", p
    status = m.sh(f"cat /proc/{main_pid}/status").stdout
    assert re.search(r"^Seccomp:\s+2$", status, re.M), f"no seccomp filter on the service:\n{status}"
    assert re.search(r"^NoNewPrivs:\s+1$", status, re.M), status
    assert re.search(r"^CapEff:\s+0+$", status, re.M), status
    assert re.search(r"^Uid:\s+850\s", status, re.M), status
    # The probe under the unit's own sandbox (a copy of it), then with W^X off in a drop-in.
    (m.srv / "wxprobe.py").write_text(WX_PROBE)
    m.sh(PROBE_SCRIPT)
    probes = wait_until(lambda: len(r := re.findall(r"^wx-probe: .*$", m.journal(PROBE_UNIT), re.M)) >= 2 and r,
                        timeout=30, what="both W^X probes' lines in the journal")
    assert probes[0].startswith("wx-probe: refused"), f"the unit's sandbox allowed W+X memory: {probes}"
    assert probes[1] == "wx-probe: allowed", f"the probe maps no W+X memory even without W^X: {probes}"
    (m.srv / "wxprobe.py").unlink()
    m.figures["W^X"] = f"the unit's sandbox: {probes[0]!r}; with MemoryDenyWriteExecute=no: {probes[1]!r}"

    # --- a camera dump: every file in exactly one place, exactly one CSV row each --------------
    staging = m.srv / "staging"
    staging.mkdir()
    for i in range(PHOTOS):
        (staging / f"IMG_{i:05d}.jpg").write_bytes(photo_bytes(i, (320, 240)))
    (staging / "IMG_broken.jpg").write_bytes(broken_bytes(0))
    inputs = collections.Counter(sha256_file(f) for f in staging.iterdir())
    for f in staging.iterdir():
        os.chown(f, 850, 850)  # an uploader in group bikewatch
    inbox, sorted_dir = m.srv / "inbox", m.srv / "sorted"
    csv_path = sorted_dir / "classifications.csv"
    first = time.monotonic()
    for f in sorted(staging.iterdir()):
        os.rename(f, inbox / f.name)

    def all_sorted() -> bool:
        waiting = [e for e in os.listdir(inbox) if not e.startswith(".")]
        if waiting or not csv_path.exists():
            return False
        rows = read_csv(csv_path)  # complete rows only: a batch's rows are appended in one write
        return len(rows) >= PHOTOS + 1 and all(len(r.get("sha256") or "") == 64 for r in rows)

    wait_until(all_sorted, timeout=120, interval=0.05, what=f"{PHOTOS + 1} files sorted with CSV rows")
    elapsed = time.monotonic() - first
    rows = read_csv(csv_path)
    assert len(rows) == PHOTOS + 1, f"{len(rows)} CSV rows for {PHOTOS + 1} files"
    for r in rows:  # the CSV names paths as the service sees them
        r["destination"] = str(m.host_path(r["destination"]))
    places = check_nothing_lost(inputs, inbox, sorted_dir, rows)
    assert places.get("rejected") == 1, places
    assert places.get("mountain", 0) + places.get("road", 0) == PHOTOS, places
    rejected = [r for r in rows if Path(r["destination"]).parent.name == "rejected"]
    assert [Path(r["destination"]).name for r in rejected] == ["IMG_broken.jpg"], rejected
    m.figures["dump"] = (f"{PHOTOS + 1} files in {elapsed:.2f} s = {(PHOTOS + 1) / elapsed:.0f} photos/s "
                         f"(first rename -> last CSV row; places {places})")

    # --- LiteRT, not TensorFlow, in every process of the service -------------------------------
    pids = m.unit_pids()
    assert main_pid in pids, (main_pid, pids)
    maps = {pid: m.sh(f"cat /proc/{pid}/maps", check=False).stdout for pid in pids}
    assert "ai_edge_litert" in maps[main_pid], "LiteRT is not mapped in the service: is this the LiteRT build?"
    with_tf = [pid for pid, text in maps.items() if re.search(r"tensorflow", text, re.I)]
    assert not with_tf, f"TensorFlow is loaded in service process(es) {with_tf}"
    hwm = sum(int(x) for x in re.findall(
        r"^VmHWM:\s+(\d+) kB", m.sh("cat " + " ".join(f"/proc/{p}/status" for p in pids), check=False).stdout,
        re.M))
    mem = m.show("MemoryCurrent", "MemoryPeak", "MemoryMax")  # MemoryPeak: systemd >= 255 only
    cgroup = ", ".join(f"{k} {int(v) / 2**20:.0f} MiB" for k in ("MemoryPeak", "MemoryCurrent")
                       if (v := mem.get(k, "")).isdigit())
    m.figures["memory"] = (f"peak RSS {hwm / 1024:.0f} MiB summed over {len(pids)} processes (VmHWM); "
                           + (cgroup or "no cgroup memory figures (no memory controller in this container's "
                                        "cgroup2, so MemoryMax= is not enforced here either)")
                           + f"; MemoryMax={mem['MemoryMax']}")

    # --- systemctl reload = SIGHUP: the model is re-loaded, the process stays ------------------
    switched = m.journal().count('"model switched"')
    m.sh(f"systemctl reload {UNIT}")
    wait_until(lambda: m.journal().count('"model switched"') > switched, timeout=60, interval=0.1,
               what="the daemon to log 'model switched' after systemctl reload")
    after = m.show("MainPID", "ActiveState", "NRestarts")
    assert after == {"MainPID": str(main_pid), "ActiveState": "active", "NRestarts": "0"}, after

    # --- systemctl stop: SIGTERM, the daemon exits 0 of its own accord -------------------------
    m.sh(f"systemctl stop {UNIT}", timeout=60)
    end = m.show("ActiveState", "Result", "ExecMainCode", "ExecMainStatus", "NRestarts")
    assert end == {"ActiveState": "inactive", "Result": "success", "ExecMainCode": "1",  # 1 = CLD_EXITED
                   "ExecMainStatus": "0", "NRestarts": "0"}, f"{end}\n{m.journal()[-3000:]}"
    assert not m.unit_pids(), "processes left in the unit's cgroup after stop"
    assert len(read_csv(csv_path)) == PHOTOS + 1

    print("\nbikewatch.service under systemd-nspawn (information only; a shared 2-core machine):")
    for k, v in m.figures.items():
        print(f"  {k:10s} {v}")


def test_security_exposure_inside_the_container(machine: Machine) -> None:
    """`systemd-analyze security` on the installed, loaded unit, by the container's systemd."""
    out = machine.sh(f"systemd-analyze security --no-pager {UNIT}").stdout
    found = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", out)
    assert found, out[-2000:]
    exposure = float(found.group(1))
    print(f"\nsystemd-analyze security {UNIT} in the container: {exposure}")
    assert exposure <= MAX_EXPOSURE, out[-3000:]
