import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tests compile fresh; the cache's own tests turn it on in a subprocess with their own folder.
os.environ.setdefault("SEGA_JAX_CACHE_DIR", "off")
