"""Settings: defaults < TOML file < ``BIKEWATCH_*`` environment < command-line flags.

Everything here is pure except :func:`validate`, which looks at the disk, so
that a bad setting stops start-up with one line naming the setting and where
its value came from.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping

DEFAULT_IGNORE: tuple[str, ...] = (
    ".*", "*.part", "*.partial", "*.tmp", "*.temp", "*.crdownload", "*.download", "*.filepart",
    "*~", "~$*", ".DS_Store", "Thumbs.db", "desktop.ini", "ehthumbs.db", "Icon\r",
)
"""Never touched: hidden files, in-progress uploads and OS metadata."""

ENV_PREFIX = "BIKEWATCH_"


class ConfigError(Exception):
    """One clear line naming the setting that stops start-up."""


@dataclass(frozen=True)
class Settings:
    inbox: Path = Path("/srv/bikewatch/inbox")
    output: Path = Path("/srv/bikewatch/sorted")
    log: Path | None = None  # default: OUTPUT/classifications.csv
    model: Path | None = None  # default: the embedded model
    work_dir: Path | None = None  # default: INBOX/.bikewatch (must be on the inbox's filesystem)
    settle_seconds: float = 1.0
    closed_settle_seconds: float = 0.1
    max_batch: int = 32
    max_wait_ms: float = 50.0
    rescan_seconds: float = 30.0
    poll: Literal["auto", "yes", "no"] = "auto"
    poll_interval_seconds: float = 2.0
    ignore: tuple[str, ...] = DEFAULT_IGNORE
    unsure_below: float = 0.0  # 0 = off: every photo goes to mountain/ or road/
    device: Literal["auto", "cpu", "gpu"] = "auto"
    decode_workers: int = 0  # 0 = one per CPU core
    read_ahead: int = 1000  # files read and classified while they settle; 0 = off
    max_pixels: int = 100_000_000
    retry_max_seconds: float = 60.0
    log_format: Literal["auto", "json", "console"] = "auto"
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    worker_name: str = field(default_factory=socket.gethostname)
    stale_worker_seconds: float = 120.0  # a worker on another host silent this long is dead
    metrics_textfile: Path | None = None
    metrics_port: int = 0  # 0 = off
    metrics_address: str = "127.0.0.1"
    watch_model: bool = True
    previews: bool = True  # classify camera JPEGs from their embedded EXIF preview when it can be trusted

    @property
    def log_path(self) -> Path:
        return self.log if self.log is not None else self.output / "classifications.csv"

    @property
    def state_dir(self) -> Path:
        return self.work_dir if self.work_dir is not None else self.inbox / ".bikewatch"


_FIELDS = {f.name: f for f in dataclasses.fields(Settings)}
_PATHS = {"inbox", "output", "log", "model", "work_dir", "metrics_textfile"}
_OPTIONAL = {"log", "model", "work_dir", "metrics_textfile"}
_CHOICES: dict[str, tuple[str, ...]] = {
    "poll": ("auto", "yes", "no"),
    "device": ("auto", "cpu", "gpu"),
    "log_format": ("auto", "json", "console"),
    "log_level": ("debug", "info", "warning", "error"),
}
_BOOLS = {"watch_model", "previews"}
_POSITIVE = {"settle_seconds", "max_batch", "rescan_seconds", "poll_interval_seconds", "max_pixels", "retry_max_seconds",
             "stale_worker_seconds"}
_NON_NEGATIVE = {"closed_settle_seconds", "max_wait_ms", "decode_workers", "read_ahead", "unsure_below", "metrics_port"}


def coerce(name: str, value: Any, origin: str) -> Any:
    """Turn a raw value (TOML, env text or flag) into the setting's type, or raise ConfigError."""
    if name not in _FIELDS:
        raise ConfigError(f"unknown setting '{name}' in {origin}")
    where = f"setting '{name}' (from {origin})"
    if name in _OPTIONAL and value in ("", None):
        return None
    try:
        if name in _PATHS:
            if not isinstance(value, (str, os.PathLike)):
                raise TypeError("expected a path")
            return Path(os.path.expanduser(str(value)))
        if name == "ignore":
            if isinstance(value, str):
                value = [v.strip() for v in value.split(",") if v.strip()]
            if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
                raise TypeError("expected a list of glob patterns")
            return tuple(value)
        if name in _BOOLS:
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError(f"expected true or false, not {value!r}")
        if name in _CHOICES:
            if isinstance(value, bool):  # poll = true / false in TOML
                value = "yes" if value else "no"
            text = str(value).strip().lower()
            if text in ("true", "on", "1") and name == "poll":
                text = "yes"
            if text in ("false", "off", "0") and name == "poll":
                text = "no"
            if text not in _CHOICES[name]:
                raise ValueError(f"must be one of {', '.join(_CHOICES[name])}, not {value!r}")
            return text
        kind = _FIELDS[name].type
        if name == "metrics_address":
            return str(value).strip()
        if kind == "int" or name in ("max_batch", "decode_workers", "read_ahead", "max_pixels", "metrics_port"):
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError(f"expected a whole number, not {value!r}")
            number: float = int(value)
        elif name == "worker_name":
            text = str(value).strip()
            if not text or "/" in text or text.startswith("."):
                raise ValueError("must be a non-empty name without '/' that does not start with '.'")
            return text
        else:
            if isinstance(value, bool):
                raise ValueError(f"expected a number, not {value!r}")
            number = float(value)
            if number != number or number in (float("inf"), float("-inf")):
                raise ValueError(f"expected a finite number, not {value!r}")  # nan would never settle
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: {exc}") from None
    if name in _POSITIVE and number <= 0:
        raise ConfigError(f"{where}: must be greater than 0, not {value!r}")
    if name in _NON_NEGATIVE and number < 0:
        raise ConfigError(f"{where}: must not be negative, not {value!r}")
    if name == "unsure_below" and number >= 1:
        raise ConfigError(f"{where}: must be below 1 (0 turns it off), not {value!r}")
    return number


def read_toml(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    # Accept either top-level keys or a [bikewatch] table.
    if set(data) == {"bikewatch"} and isinstance(data["bikewatch"], dict):
        data = data["bikewatch"]
    return data


def from_env(environ: Mapping[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in environ.items():
        if not key.startswith(ENV_PREFIX) or key == ENV_PREFIX + "CONFIG":
            continue
        name = key[len(ENV_PREFIX):].lower()
        if name not in _FIELDS:
            raise ConfigError(f"unknown setting '{name}' in environment variable {key}")
        out[name] = coerce(name, value, f"environment variable {key}")
    return out


def load_settings(
    config_file: Path | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
    base_dir: Path | None = None,
) -> Settings:
    """Layer the sources; relative paths in the file are taken relative to the file itself."""
    environ = os.environ if environ is None else environ
    if config_file is None and environ.get(ENV_PREFIX + "CONFIG"):
        config_file = Path(environ[ENV_PREFIX + "CONFIG"])
    values: dict[str, Any] = {}
    if config_file is not None:
        origin = str(config_file)
        file_dir = config_file.resolve().parent
        for key, raw in read_toml(config_file).items():
            value = coerce(key, raw, origin)
            if key in _PATHS and isinstance(value, Path) and not value.is_absolute():
                value = file_dir / value
            values[key] = value
    values.update(from_env(environ))
    for key, raw in (overrides or {}).items():
        if raw is not None:
            values[key] = coerce(key, raw, f"--{key.replace('_', '-')}")
    cwd = base_dir or Path.cwd()
    for key in _PATHS:
        if isinstance(values.get(key), Path):
            # Absolute and normalised (no "config/../var") so logs and the CSV read cleanly.
            values[key] = Path(os.path.abspath(cwd / values[key]))
    return Settings(**values)


def _read_only_fs(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def _inside(child: Path, parent: Path) -> bool:
    try:
        child.resolve().relative_to(parent.resolve())
        return True
    except ValueError:
        return False


def validate(settings: Settings) -> Settings:
    """Check the disk: inbox exists, output is usable and not inside the inbox, and so on."""
    inbox, output = settings.inbox, settings.output
    if not inbox.exists():
        raise ConfigError(f"setting 'inbox': folder does not exist: {inbox}")
    if not inbox.is_dir():
        raise ConfigError(f"setting 'inbox': not a folder: {inbox}")
    if not os.access(inbox, os.R_OK | os.W_OK | os.X_OK):
        raise ConfigError(f"setting 'inbox': no read/write permission on {inbox}")
    if _inside(output, inbox):
        raise ConfigError(f"setting 'output': {output} is inside the inbox {inbox}; sorted photos would be sorted again")
    if _inside(inbox, output):
        raise ConfigError(f"setting 'inbox': {inbox} is inside the output folder {output}")
    if output.exists() and not output.is_dir():
        raise ConfigError(f"setting 'output': not a folder: {output}")
    parent = output if output.exists() else output.parent
    if not parent.exists():
        raise ConfigError(f"setting 'output': neither {output} nor its parent folder exists")
    if not os.access(parent, os.W_OK | os.X_OK) and not _read_only_fs(parent):
        # A read-only *filesystem* is an outage, not a setting: the service starts and waits for it.
        raise ConfigError(f"setting 'output': no write permission on {parent}")
    if settings.model is not None and not settings.model.is_file():
        raise ConfigError(f"setting 'model': file not found: {settings.model}")
    if settings.model is not None and not os.access(settings.model, os.R_OK):
        raise ConfigError(f"setting 'model': file not readable: {settings.model}")
    state = settings.state_dir
    probe = state if state.exists() else state.parent
    if probe.exists() and os.stat(probe).st_dev != os.stat(inbox).st_dev:
        raise ConfigError(
            f"setting 'work_dir': {state} must be on the same filesystem as the inbox, "
            "so that claiming a photo is one atomic rename"
        )
    if settings.work_dir is not None and _inside(settings.work_dir, output):
        raise ConfigError(f"setting 'work_dir': {settings.work_dir} must not be inside the output folder")
    log = settings.log_path
    if log.exists() and log.is_dir():
        raise ConfigError(f"setting 'log': {log} is a folder, not a CSV file")
    if _inside(log, inbox):
        raise ConfigError(f"setting 'log': {log} is inside the inbox")
    return settings


def describe(settings: Settings) -> dict[str, Any]:
    """Settings as plain values for the start-up log line."""
    out: dict[str, Any] = {}
    for name in _FIELDS:
        value = getattr(settings, name)
        out[name] = str(value) if isinstance(value, Path) else (list(value) if isinstance(value, tuple) else value)
    out["log"] = str(settings.log_path)
    out["work_dir"] = str(settings.state_dir)
    return out
