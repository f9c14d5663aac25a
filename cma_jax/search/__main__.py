"""`python -m cma_jax.search`: the command line (cma_jax.search.cli)."""

import sys

from cma_jax import console
from cma_jax.search.cli import main

if __name__ == "__main__":
    console.setup()
    sys.exit(main())
