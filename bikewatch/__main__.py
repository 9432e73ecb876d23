import sys

from bikewatch.cli import main

sys.exit(main())
