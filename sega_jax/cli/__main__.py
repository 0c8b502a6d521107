"""`python -m sega_jax.cli ...`: the same as the `sega-jax` command."""

from sega_jax.cli.generate import main

raise SystemExit(main())
