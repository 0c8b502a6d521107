"""`sega-jax`: the command line. `generate` (the default verb and the dispatcher to `edit`, `sweep`, `bench`
and `app`, which it names as modules and imports only when asked), `edit` (LEDITS++ on a photo), `common`
(the parser, flag types, cache flag and warnings they share). May import `settings`, `pipelines` and below;
never `sweep`, `app` or `bench`.
"""

from sega_jax.cli.generate import main

__all__ = ["main"]
