"""`python -m topd_jax.plan`: see topd_jax/plan/cli.py."""

import sys

from topd_jax.plan.cli import main

sys.exit(main())
