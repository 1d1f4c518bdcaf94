"""Notebook runs under pytest (nbmake): the small sizes, on the CPU.

nbmake starts each notebook's kernel as a subprocess of pytest (of its xdist worker, which is
itself a subprocess of the pytest command), and kernels inherit that environment, so the
variables set here, at collection, before any kernel starts, reach every notebook. Each
notebook's parameters cell reads TOPD_NOTEBOOK_SMALL: "1" runs a smoke size in about a minute;
unset (a user running a notebook by hand) it runs the full size.
"""

import os

os.environ["TOPD_NOTEBOOK_SMALL"] = "1"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
