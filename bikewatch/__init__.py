"""bikewatch: watch an inbox, sort bike photos into mountain/ and road/ with a small CNN."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("bikewatch")
except PackageNotFoundError:  # running from a source tree without install
    __version__ = "0.0.0+unknown"
