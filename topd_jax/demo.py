"""`python -m topd_jax.demo`, the README's first command: `topd_jax.experiments.demo`."""

from topd_jax.experiments.demo import main

if __name__ == "__main__":
    raise SystemExit(main())
