import sys

from bikewatch.cli import main

if __name__ == "__main__":  # not when a decode worker is spawned (it imports this module)
    sys.exit(main())
