"""``bikewatch run``, the CLI adapter: settings from the config, logging, then the service."""

from __future__ import annotations

import argparse
import sys

from bikewatch.config import ConfigError, load_settings, validate
from bikewatch.exits import Exit
from bikewatch.logs import configure, get_logger
from bikewatch.service.loop import Service
from bikewatch.service.systemd import Notifier


def run_service(args: argparse.Namespace) -> int:
    overrides = {"inbox": args.inbox, "output": args.output, "log": args.log, "model": args.model}
    try:
        settings = validate(load_settings(args.config, overrides=overrides))
    except ConfigError as exc:
        print(f"bikewatch: error: {exc}", file=sys.stderr)
        return Exit.USAGE
    configure(settings.log_format, settings.log_level)  # W^X and TensorFlow: runtime.require_tensorflow
    notifier = Notifier.from_environ()
    try:
        return Service(settings, notifier).run()
    except ConfigError as exc:
        get_logger().error("configuration error", error=str(exc))
        return Exit.USAGE
