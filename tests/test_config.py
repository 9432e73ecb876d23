"""Settings: defaults < TOML < BIKEWATCH_* environment < flags, coercion errors, validate().

Pure and fast: no TensorFlow, real files in tmp_path, explicit ``environ``
mappings (the process environment is never read or changed).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from bikewatch.config import (
    DEFAULT_IGNORE, ConfigError, Settings, coerce, describe, from_env, load_settings, read_toml, validate,
)


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


# --------------------------------------------------------------------------- layering


def test_defaults_without_any_source(tmp_path: Path) -> None:
    s = load_settings(None, environ={}, base_dir=tmp_path)
    assert s == Settings(worker_name=s.worker_name)
    assert s.settle_seconds == 1.0 and s.poll == "auto" and s.unsure_below == 0.0
    assert s.ignore == DEFAULT_IGNORE
    assert s.log_path == s.output / "classifications.csv"
    assert s.state_dir == s.inbox / ".bikewatch"


def test_precedence_defaults_file_env_flags(tmp_path: Path) -> None:
    cfg = write(tmp_path / "etc" / "bw.toml",
                'inbox = "/from/file/inbox"\noutput = "/from/file/out"\nsettle_seconds = 2.5\n'
                'max_batch = 8\nlog = "/from/file/log.csv"\n')
    env = {"BIKEWATCH_OUTPUT": "/from/env/out", "BIKEWATCH_MAX_BATCH": "4", "BIKEWATCH_LOG": "/from/env/log.csv"}
    s = load_settings(cfg, environ=env, overrides={"log": "/from/flag/log.csv", "inbox": None}, base_dir=tmp_path)
    assert s.inbox == Path("/from/file/inbox")  # file beats default; a flag left out (None) changes nothing
    assert s.output == Path("/from/env/out")  # env beats file
    assert s.max_batch == 4 and isinstance(s.max_batch, int)
    assert s.settle_seconds == 2.5  # file beats default
    assert s.log == Path("/from/flag/log.csv")  # flag beats env and file
    assert s.max_wait_ms == 50.0  # untouched default


def test_config_file_named_by_environment(tmp_path: Path) -> None:
    cfg = write(tmp_path / "bw.toml", "rescan_seconds = 7\n")
    s = load_settings(None, environ={"BIKEWATCH_CONFIG": str(cfg)}, base_dir=tmp_path)
    assert s.rescan_seconds == 7.0


def test_bikewatch_table_is_accepted(tmp_path: Path) -> None:
    cfg = write(tmp_path / "bw.toml", "[bikewatch]\nmax_batch = 3\npoll = true\n")
    s = load_settings(cfg, environ={}, base_dir=tmp_path)
    assert s.max_batch == 3 and s.poll == "yes"


def test_relative_paths_in_file_are_relative_to_the_file(tmp_path: Path) -> None:
    cfg = write(tmp_path / "etc" / "conf" / "bw.toml",
                'inbox = "../var/inbox"\noutput = "out"\nmodel = "models/m.keras"\n')
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    s = load_settings(cfg, environ={}, base_dir=elsewhere)
    assert s.inbox == tmp_path / "etc" / "var" / "inbox"  # normalised, no ".."
    assert s.output == tmp_path / "etc" / "conf" / "out"
    assert s.model == tmp_path / "etc" / "conf" / "models" / "m.keras"


def test_relative_paths_from_env_and_flags_are_relative_to_cwd(tmp_path: Path) -> None:
    s = load_settings(None, environ={"BIKEWATCH_INBOX": "in"}, overrides={"output": Path("out")}, base_dir=tmp_path)
    assert s.inbox == tmp_path / "in"
    assert s.output == tmp_path / "out"


def test_tilde_is_expanded(tmp_path: Path) -> None:
    s = load_settings(None, environ={"BIKEWATCH_INBOX": "~/bw-inbox"}, base_dir=tmp_path)
    assert s.inbox == Path(os.path.expanduser("~/bw-inbox"))


def test_empty_optional_path_means_default(tmp_path: Path) -> None:
    cfg = write(tmp_path / "bw.toml", 'model = "/some/model.keras"\n')
    s = load_settings(cfg, environ={"BIKEWATCH_MODEL": ""}, base_dir=tmp_path)
    assert s.model is None


def test_env_values_are_coerced(tmp_path: Path) -> None:
    env = {"BIKEWATCH_WATCH_MODEL": "off", "BIKEWATCH_POLL": "TRUE", "BIKEWATCH_IGNORE": "*.part, .*, ,x~",
           "BIKEWATCH_UNSURE_BELOW": "0.75", "BIKEWATCH_LOG_LEVEL": "Debug", "BIKEWATCH_WORKER_NAME": " sorter-1 "}
    s = load_settings(None, environ=env, base_dir=tmp_path)
    assert s.watch_model is False
    assert s.poll == "yes"
    assert s.ignore == ("*.part", ".*", "x~")
    assert s.unsure_below == 0.75
    assert s.log_level == "debug"
    assert s.worker_name == "sorter-1"


def test_unrelated_environment_is_ignored(tmp_path: Path) -> None:
    s = load_settings(None, environ={"HOME": "/root", "BIKEWATCHX": "1", "bikewatch_inbox": "/x"}, base_dir=tmp_path)
    assert s.inbox == Path("/srv/bikewatch/inbox")


def test_describe_is_plain_values(tmp_path: Path) -> None:
    d = describe(load_settings(None, environ={"BIKEWATCH_INBOX": "/in"}, base_dir=tmp_path))
    assert d["inbox"] == "/in" and d["work_dir"] == "/in/.bikewatch"
    assert d["log"] == "/srv/bikewatch/sorted/classifications.csv"
    assert isinstance(d["ignore"], list)


# --------------------------------------------------------------------------- errors name the setting


def test_unknown_key_in_file_names_key_and_file(tmp_path: Path) -> None:
    cfg = write(tmp_path / "bw.toml", "inbox = '/in'\nsettle_secs = 1\n")
    with pytest.raises(ConfigError) as exc:
        load_settings(cfg, environ={}, base_dir=tmp_path)
    assert "settle_secs" in str(exc.value) and str(cfg) in str(exc.value)


def test_unknown_table_in_file_is_an_error(tmp_path: Path) -> None:
    cfg = write(tmp_path / "bw.toml", "inbox = '/in'\n[watch]\npoll = 'yes'\n")
    with pytest.raises(ConfigError, match="unknown setting 'watch'"):
        load_settings(cfg, environ={}, base_dir=tmp_path)


def test_unknown_env_variable_names_the_variable(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as exc:
        from_env({"BIKEWATCH_SETTLE": "1"})
    assert "BIKEWATCH_SETTLE" in str(exc.value) and "'settle'" in str(exc.value)


@pytest.mark.parametrize(
    ("text", "name", "detail"),
    [
        ("settle_seconds = 'soon'", "settle_seconds", "soon"),
        ("settle_seconds = 0", "settle_seconds", "greater than 0"),
        ("settle_seconds = true", "settle_seconds", "number"),
        ("max_batch = 2.5", "max_batch", "whole number"),
        ("max_batch = -3", "max_batch", "greater than 0"),
        ("decode_workers = -1", "decode_workers", "negative"),
        ("unsure_below = 1.0", "unsure_below", "below 1"),
        ("poll = 'sometimes'", "poll", "auto, yes, no"),
        ("device = 'tpu'", "device", "auto, cpu, gpu"),
        ("watch_model = 'maybe'", "watch_model", "true or false"),
        ("inbox = 5", "inbox", "path"),
        ("ignore = [1, 2]", "ignore", "glob"),
        ("worker_name = '../evil'", "worker_name", "/"),
        ("worker_name = '.hidden'", "worker_name", "'.'"),
    ],
)
def test_bad_value_in_file_names_setting_and_origin(tmp_path: Path, text: str, name: str, detail: str) -> None:
    cfg = write(tmp_path / "bw.toml", text + "\n")
    with pytest.raises(ConfigError) as exc:
        load_settings(cfg, environ={}, base_dir=tmp_path)
    msg = str(exc.value)
    assert f"setting '{name}'" in msg and str(cfg) in msg and detail in msg
    assert "\n" not in msg


@pytest.mark.parametrize(
    ("var", "value", "name"),
    [
        ("BIKEWATCH_MAX_BATCH", "lots", "max_batch"),
        ("BIKEWATCH_MAX_BATCH", "0", "max_batch"),
        ("BIKEWATCH_SETTLE_SECONDS", "-1", "settle_seconds"),
        ("BIKEWATCH_WATCH_MODEL", "2", "watch_model"),
        ("BIKEWATCH_LOG_FORMAT", "xml", "log_format"),
        ("BIKEWATCH_SETTLE_SECONDS", "nan", "settle_seconds"),
        ("BIKEWATCH_RETRY_MAX_SECONDS", "inf", "retry_max_seconds"),
    ],
)
def test_bad_value_in_env_names_setting_and_variable(tmp_path: Path, var: str, value: str, name: str) -> None:
    with pytest.raises(ConfigError) as exc:
        load_settings(None, environ={var: value}, base_dir=tmp_path)
    assert f"setting '{name}'" in str(exc.value) and f"environment variable {var}" in str(exc.value)


def test_bad_flag_value_names_the_flag(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"setting 'inbox' \(from --inbox\)"):
        load_settings(None, environ={}, overrides={"inbox": 3}, base_dir=tmp_path)


def test_coerce_unknown_name() -> None:
    with pytest.raises(ConfigError, match="unknown setting 'colour' in --colour"):
        coerce("colour", "red", "--colour")


def test_later_layer_does_not_rescue_an_earlier_bad_value(tmp_path: Path) -> None:
    # A broken file is reported even when the environment overrides that setting.
    cfg = write(tmp_path / "bw.toml", "max_batch = 'x'\n")
    with pytest.raises(ConfigError, match="max_batch"):
        load_settings(cfg, environ={"BIKEWATCH_MAX_BATCH": "4"}, base_dir=tmp_path)


def test_missing_and_malformed_config_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        read_toml(tmp_path / "nope.toml")
    bad = write(tmp_path / "bad.toml", "inbox = \n")
    with pytest.raises(ConfigError, match="not valid TOML") as exc:
        read_toml(bad)
    assert str(bad) in str(exc.value)


# --------------------------------------------------------------------------- validate()


@pytest.fixture
def dirs(tmp_path: Path) -> tuple[Path, Path]:
    inbox, output = tmp_path / "inbox", tmp_path / "sorted"
    inbox.mkdir()
    return inbox, output


def settings(inbox: Path, output: Path, **kw: object) -> Settings:
    return Settings(inbox=inbox, output=output, worker_name="t", **kw)  # type: ignore[arg-type]


def test_validate_accepts_good_settings(dirs: tuple[Path, Path]) -> None:
    inbox, output = dirs
    s = settings(inbox, output)
    assert validate(s) is s  # output may not exist yet: its parent does


def test_validate_missing_inbox(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="setting 'inbox': folder does not exist"):
        validate(settings(tmp_path / "nope", tmp_path / "out"))


def test_validate_inbox_is_a_file(tmp_path: Path) -> None:
    f = write(tmp_path / "inbox", "x")
    with pytest.raises(ConfigError, match="setting 'inbox': not a folder"):
        validate(settings(f, tmp_path / "out"))


@pytest.mark.parametrize("where", ["inside", "same"])
def test_validate_output_inside_inbox(dirs: tuple[Path, Path], where: str) -> None:
    inbox, _ = dirs
    output = inbox / "sorted" if where == "inside" else inbox
    with pytest.raises(ConfigError, match="setting 'output'.*inside the inbox"):
        validate(settings(inbox, output))


def test_validate_output_inside_inbox_through_a_symlink(tmp_path: Path, dirs: tuple[Path, Path]) -> None:
    inbox, _ = dirs
    (tmp_path / "alias").symlink_to(inbox)
    with pytest.raises(ConfigError, match="setting 'output'"):
        validate(settings(inbox, tmp_path / "alias" / "sorted"))


def test_validate_inbox_inside_output(tmp_path: Path) -> None:
    (tmp_path / "out" / "in").mkdir(parents=True)
    with pytest.raises(ConfigError, match="setting 'inbox'.*inside the output"):
        validate(settings(tmp_path / "out" / "in", tmp_path / "out"))


def test_validate_output_is_a_file(dirs: tuple[Path, Path]) -> None:
    inbox, output = dirs
    write(output, "x")
    with pytest.raises(ConfigError, match="setting 'output': not a folder"):
        validate(settings(inbox, output))


def test_validate_output_without_parent(dirs: tuple[Path, Path], tmp_path: Path) -> None:
    inbox, _ = dirs
    with pytest.raises(ConfigError, match="setting 'output': neither"):
        validate(settings(inbox, tmp_path / "a" / "b" / "out"))


def test_validate_model_missing_or_a_folder(dirs: tuple[Path, Path], tmp_path: Path) -> None:
    inbox, output = dirs
    with pytest.raises(ConfigError, match="setting 'model': file not found"):
        validate(settings(inbox, output, model=tmp_path / "missing.keras"))
    (tmp_path / "folder.keras").mkdir()
    with pytest.raises(ConfigError, match="setting 'model'"):
        validate(settings(inbox, output, model=tmp_path / "folder.keras"))


@pytest.mark.skipif(os.geteuid() == 0, reason="root can read a mode-000 file")
def test_validate_model_unreadable(dirs: tuple[Path, Path], tmp_path: Path) -> None:
    inbox, output = dirs
    model = write(tmp_path / "m.keras", "x")
    model.chmod(0)
    with pytest.raises(ConfigError, match="setting 'model': file not readable"):
        validate(settings(inbox, output, model=model))


def test_validate_log_is_a_folder(dirs: tuple[Path, Path], tmp_path: Path) -> None:
    inbox, output = dirs
    (tmp_path / "log.csv").mkdir()
    with pytest.raises(ConfigError, match="setting 'log'"):
        validate(settings(inbox, output, log=tmp_path / "log.csv"))


def test_validate_log_inside_inbox(dirs: tuple[Path, Path]) -> None:
    inbox, output = dirs
    with pytest.raises(ConfigError, match="setting 'log'.*inside the inbox"):
        validate(settings(inbox, output, log=inbox / "log.csv"))


def test_validate_work_dir_inside_output(dirs: tuple[Path, Path]) -> None:
    inbox, output = dirs
    output.mkdir()
    with pytest.raises(ConfigError, match="setting 'work_dir'"):
        validate(settings(inbox, output, work_dir=output / "state"))


def test_validate_work_dir_on_another_filesystem(dirs: tuple[Path, Path]) -> None:
    inbox, output = dirs
    shm = Path("/dev/shm")
    if not shm.is_dir() or os.stat(shm).st_dev == os.stat(inbox).st_dev:
        pytest.skip("needs /dev/shm on a filesystem other than tmp_path's")
    with pytest.raises(ConfigError, match="setting 'work_dir'.*same filesystem"):
        validate(settings(inbox, output, work_dir=shm / "bikewatch-state-test"))


def test_every_validate_error_is_one_line_naming_a_setting(dirs: tuple[Path, Path], tmp_path: Path) -> None:
    inbox, output = dirs
    cases = [
        settings(tmp_path / "nope", output),
        settings(inbox, inbox / "x"),
        settings(inbox, output, model=tmp_path / "nope.keras"),
    ]
    for s in cases:
        with pytest.raises(ConfigError) as exc:
            validate(s)
        assert "\n" not in str(exc.value) and str(exc.value).startswith("setting '")
