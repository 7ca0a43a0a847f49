"""``python -m sleep_jax.bench``."""

import sys

from sleep_jax.bench.cli import main

sys.exit(main())
