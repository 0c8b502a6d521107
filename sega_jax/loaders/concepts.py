"""Learned concepts (textual inversion): new tokens whose embeddings are trained with optax, loaded as
diffusers loads them, and then usable anywhere a prompt is, SEGA's concepts included
(`editing_prompt=["<my-style>"]`).

- `learn(pipe, images, placeholder_token=..., initializer_token=...)` adds the token to the pipeline's
  tokenizer and text encoder and trains only its embedding row (AdamW, as diffusers' textual inversion
  examples), on the pipeline's own denoising loss: noised VAE latents of the images at random training
  timesteps, the captions "a photo of a <token>"-like templates. One jitted step; the batch is spread
  over the local devices (data parallel) when it divides evenly.
- `save(path, embeddings)` writes diffusers' `learned_embeds.safetensors` ({token: (vectors, hidden)}).
- `load_textual_inversion(pipe, source, token=None)` (also `pipe.load_textual_inversion`) reads diffusers'
  files and the A1111 formats (`string_to_param` in a pickled .pt or .bin, only with `allow_pickle=True`;
  `emb_params` in a .safetensors), and multi-vector embeddings as diffusers does: tokens `tok`, `tok_1`,
  ..., and every prompt's `tok` is expanded to `tok tok_1 ...` before tokenizing (`expand_prompt`).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from sega_jax.models.tokenizer import expand_prompt, tokenize
from sega_jax.models.weights import read_safetensors

WEIGHT_NAMES = ("learned_embeds.safetensors", "learned_embeds.bin")
# The first templates of diffusers' textual inversion examples (`imagenet_templates_small`).
TEMPLATES = ("a photo of a {}", "a rendering of a {}", "a cropped photo of the {}", "the photo of a {}",
             "a photo of a clean {}", "a close-up photo of a {}", "a bright photo of the {}",
             "a good photo of a {}")


class ConceptError(ValueError):
    """An embedding file or token that cannot be added; the message names the file or token."""


# -- reading ---------------------------------------------------------------------------------------------


def _to_numpy(value) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor from an opted-in pickled file
        value = value.detach().cpu().float().numpy()
    return np.asarray(value, np.float32)


def _file(path: Path, weight_name: str | None) -> Path:
    if path.is_file():
        return path
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: textual inversion file or folder not found")
    names = (weight_name,) if weight_name else WEIGHT_NAMES
    for name in names:
        if (path / name).is_file():
            return path / name
    raise FileNotFoundError(f"{path}: no textual inversion weights (looked for {', '.join(names)})")


def _read(path: Path, allow_pickle: bool) -> dict:
    if path.suffix == ".safetensors":
        return dict(read_safetensors(path))
    if not allow_pickle:
        raise ConceptError(f"{path}: not a .safetensors file; a pickled file can execute code when loaded. "
                           "Pass allow_pickle=True to read it (with torch's weights_only=True), or convert "
                           "it.")
    import torch  # only for opted-in pickled files

    return torch.load(path, map_location="cpu", weights_only=True)


def read_embeddings(source, token: str | None = None, *, weight_name: str | None = None,
                    allow_pickle: bool = False) -> tuple[str, np.ndarray]:
    """(token, embeddings (vectors, hidden) float32) from a file, a folder (+ `weight_name`) or a state
    dict, in diffusers' format ({token: tensor}) or A1111's (`string_to_param` / `emb_params`); `token`
    overrides the file's own, as in diffusers."""
    where = "state dict" if isinstance(source, Mapping) else None
    if where is None:
        path = _file(Path(source), weight_name)
        state, where = _read(path, allow_pickle), str(path)
    else:
        state = dict(source)
    if "string_to_param" in state:  # A1111: {"string_to_param": {"*": tensor}, "name": ...}
        (value,) = state["string_to_param"].values()
        found = state.get("name")
    elif "emb_params" in state:  # A1111 as safetensors
        value, found = state["emb_params"], None
    elif len(state) == 1:  # diffusers: {token: tensor}
        ((found, value),) = state.items()
    else:
        raise ConceptError(f"{where}: not a textual inversion embedding (expected one {{token: tensor}}, "
                           f"'string_to_param' or 'emb_params'; found keys {sorted(state)[:8]})")
    token = token or found
    if not token:
        raise ConceptError(f"{where}: the file names no token; pass token='<...>'")
    embeddings = _to_numpy(value)
    embeddings = embeddings[None] if embeddings.ndim == 1 else embeddings
    if embeddings.ndim != 2 or not np.isfinite(embeddings).all():
        raise ConceptError(f"{where}: embeddings of {token!r} must be finite with shape (hidden,) or "
                           f"(vectors, hidden); got {embeddings.shape}")
    return token, embeddings


# -- adding tokens to a tokenizer and text encoder -----------------------------------------------------------


def vector_tokens(token: str, count: int) -> list[str]:
    """diffusers' names for a multi-vector embedding: tok, tok_1, tok_2, ..."""
    return [token] + [f"{token}_{i}" for i in range(1, count)]


def _token_embedding(text_encoder):
    return text_encoder.text_model.embeddings.token_embedding


def check_tokens(tokenizer, text_encoder, token: str, embeddings: np.ndarray,
                 where: str = "textual inversion", taken: set[str] = frozenset()) -> list[str]:
    """The token names `embeddings` would add; an error naming `where` if the hidden size differs from
    the text encoder's or a name is already in the vocabulary (diffusers raises there too) or in `taken`."""
    hidden = _token_embedding(text_encoder).weight.shape[1]
    if embeddings.shape[1] != hidden:
        raise ConceptError(f"{where}: embeddings of {token!r} have hidden size {embeddings.shape[1]}, "
                           f"the text encoder {hidden} (an embedding for another model?)")
    names = vector_tokens(token, len(embeddings))
    vocab = tokenizer.get_vocab()
    clash = [name for name in names if name in vocab or name in taken]
    if clash:
        raise ConceptError(f"{where}: token {clash[0]!r} is already in the tokenizer's vocabulary; pass "
                           "another token=")
    return names


def add_tokens(tokenizer, text_encoder, token: str, embeddings: np.ndarray) -> list[int]:
    """Adds `token` (and its vector siblings) to the tokenizer and grows the text encoder's table with
    `embeddings`; returns the new ids."""
    table = _token_embedding(text_encoder)
    names = check_tokens(tokenizer, text_encoder, token, embeddings)
    tokenizer.add_tokens(names)
    ids = tokenizer.convert_tokens_to_ids(names)
    if ids != list(range(table.weight.shape[0], table.weight.shape[0] + len(names))):
        raise ConceptError(f"token {token!r}: the tokenizer gave ids {ids}, not the next rows of the text "
                           f"encoder's table ({table.weight.shape[0]}...); tokenizer and text encoder differ")
    rows = jnp.asarray(embeddings, table.weight.dtype)
    table.weight = nnx.Param(jnp.concatenate([table.weight[...], rows]))
    text_encoder.config = dataclasses.replace(text_encoder.config, vocab_size=table.weight.shape[0])
    return ids


def load_textual_inversion(pipe, source, token: str | None = None, *, weight_name: str | None = None,
                           allow_pickle: bool = False, tokenizer=None, text_encoder=None) -> list[str]:
    """Loads embeddings into the pipeline (diffusers' `load_textual_inversion`): by default into
    `pipe.tokenizer` / `pipe.text_encoder`; pass SDXL's `tokenizer_2` / `text_encoder_2` for the second
    encoder, as with diffusers. `source` may be a list of sources (with a list of tokens). Returns the
    tokens added."""
    sources = list(source) if isinstance(source, list | tuple) else [source]
    tokens = list(token) if isinstance(token, list | tuple) else [token] * len(sources)
    if len(tokens) != len(sources):
        raise ConceptError(f"load_textual_inversion: {len(sources)} sources but {len(tokens)} tokens")
    tokenizer = tokenizer if tokenizer is not None else pipe.tokenizer
    text_encoder = text_encoder if text_encoder is not None else pipe.text_encoder
    read = [read_embeddings(s, t, weight_name=weight_name, allow_pickle=allow_pickle)
            for s, t in zip(sources, tokens, strict=True)]
    taken: set[str] = set()
    for s, (name, embeddings) in zip(sources, read, strict=True):  # all checked before anything changes
        where = "state dict" if isinstance(s, Mapping) else str(s)
        taken.update(check_tokens(tokenizer, text_encoder, name, embeddings, where, taken))
    added = []
    for name, embeddings in read:
        add_tokens(tokenizer, text_encoder, name, embeddings)
        added.append(name)
    pipe.conditioning.refresh()
    return added


def save(path, embeddings: Mapping[str, np.ndarray]) -> Path:
    """diffusers' `learned_embeds.safetensors`: {token: (vectors, hidden) float32}. `path` is the file or
    a folder (the file is written inside it)."""
    from safetensors.numpy import save_file

    path = Path(path)
    if path.suffix != ".safetensors":
        path.mkdir(parents=True, exist_ok=True)
        path = path / WEIGHT_NAMES[0]
    tensors = {token: np.ascontiguousarray(np.atleast_2d(np.asarray(e, np.float32)))
               for token, e in embeddings.items()}
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp))
    tmp.replace(path)  # nothing half-written is left under the final name
    return path


# -- learning ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LearnResult:
    token: str
    embeddings: np.ndarray  # (vectors, hidden) float32
    losses: np.ndarray  # the training loss at each step (its own random draws: noisy)
    loss_before: float  # the loss on every image with fixed draws, at the initial embedding
    loss_after: float  # ... and at the learned one


def _images(images, size: tuple[int, int]) -> np.ndarray:
    """PIL images or an array (N, H, W, 3) in [0, 1] (float) or uint8 -> float32 NHWC in [-1, 1]."""
    from PIL import Image

    if isinstance(images, np.ndarray | jax.Array) and np.asarray(images).ndim == 4:
        array = np.asarray(images)
        array = array.astype(np.float32) / 255.0 if array.dtype == np.uint8 else array.astype(np.float32)
        if array.shape[1:3] != size:
            array = np.stack([np.asarray(Image.fromarray(np.uint8(np.round(a * 255))).resize(
                size[::-1], Image.BICUBIC), np.float32) / 255.0 for a in array])
    else:
        array = np.stack([np.asarray(im.convert("RGB").resize(size[::-1], Image.BICUBIC), np.float32) / 255.0
                          for im in images])
    if array.ndim != 4 or array.shape[-1] != 3 or not np.isfinite(array).all():
        raise ValueError(f"images: expected RGB images (PIL or an (N, H, W, 3) array), got {array.shape}")
    return array * 2.0 - 1.0


@functools.partial(jax.jit, static_argnames=("vae_graph",))
def _posterior(vae_graph, vae_state, pixels):
    return nnx.merge(vae_graph, vae_state).encode(pixels)


def _denoising_loss(rows, models, batch, key, v_prediction: bool):
    """SD's training loss with `rows` written into the token table at `first_id`: noised latents of the
    batch at random timesteps (the key's draws), MSE of the UNet's epsilon (or v) prediction."""
    unet_graph, unet_state, text_graph, table_state, rest = models
    ids, first_id, mean, logvar, scaling, abar = batch
    k_latent, k_noise, k_t = jax.random.split(key, 3)
    x0 = (mean + jnp.exp(0.5 * logvar) * jax.random.normal(k_latent, mean.shape)) * scaling
    noise = jax.random.normal(k_noise, x0.shape)
    t = jax.random.randint(k_t, (x0.shape[0],), 0, abar.shape[0])
    a = abar[t][:, None, None, None]
    xt = jnp.sqrt(a) * x0 + jnp.sqrt(1.0 - a) * noise
    target = jnp.sqrt(a) * noise - jnp.sqrt(1.0 - a) * x0 if v_prediction else noise
    table = jax.tree.map(lambda t: jax.lax.dynamic_update_slice(t, rows.astype(t.dtype), (first_id, 0)),
                         table_state)
    text = nnx.merge(text_graph, table, rest)
    prediction = nnx.merge(unet_graph, unet_state)(xt, t, text(ids)).astype(jnp.float32)
    return jnp.mean((prediction - target) ** 2)


@functools.partial(jax.jit, static_argnames=("optimizer", "v_prediction"),
                   donate_argnames=("rows", "opt_state"))
def _step(rows, opt_state, models, batch, key, optimizer, v_prediction):
    loss, grads = jax.value_and_grad(_denoising_loss)(rows, models, batch, key, v_prediction)
    updates, opt_state = optimizer.update(grads, opt_state, rows)
    return optax.apply_updates(rows, updates), opt_state, loss


@functools.partial(jax.jit, static_argnames=("v_prediction",))
def _fixed_loss(rows, models, batch, key, v_prediction, repeats: int = 8):
    """The loss averaged over `repeats` fixed draws of the whole set: comparable before and after."""
    keys = jax.random.split(key, repeats)
    return jnp.mean(jax.vmap(lambda k: _denoising_loss(rows, models, batch, k, v_prediction))(keys))


def learn(pipe, images, placeholder_token: str, initializer_token: str, *, num_vectors: int = 1,
          steps: int = 500, learning_rate: float = 5e-3, batch_size: int = 4, seed: int = 0,
          templates: Sequence[str] = TEMPLATES, size: tuple[int, int] | None = None) -> LearnResult:
    """Textual inversion on an SD pipeline: adds `placeholder_token` (initialised from the embedding of
    `initializer_token`, one word) and trains its row(s) only, with AdamW (weight decay 1e-2, as diffusers'
    examples). Deterministic in `seed`. The token stays in the pipeline; `save` writes it."""
    if getattr(pipe, "text_encoder_2", None) is not None:
        raise ValueError("learn: SD 1.x/2.x pipelines only (an SDXL concept needs both encoders' rows)")
    if steps < 1 or batch_size < 1 or not np.isfinite(learning_rate) or learning_rate <= 0:
        raise ValueError("learn: steps and batch_size must be >= 1 and learning_rate a positive number")
    init_ids = pipe.tokenizer.encode(initializer_token, add_special_tokens=False)
    if len(init_ids) != 1:
        raise ValueError(f"initializer_token={initializer_token!r} must be one token (it is {len(init_ids)})")
    table = _token_embedding(pipe.text_encoder).weight
    init = np.repeat(np.asarray(table[init_ids[0]], np.float32)[None], num_vectors, axis=0)
    first_id = add_tokens(pipe.tokenizer, pipe.text_encoder, placeholder_token, init)[0]
    pipe.conditioning.refresh()

    size = size or (pipe.unet.config.sample_size * pipe.vae_scale_factor,) * 2
    vae_graph, vae_state = nnx.split(pipe.vae)
    mean, logvar = (np.asarray(x, np.float32) for x in _posterior(vae_graph, vae_state,
                                                                  jnp.asarray(_images(images, tuple(size)))))
    captions = [expand_prompt(pipe.tokenizer, t.format(placeholder_token)) for t in templates]
    caption_ids = tokenize(pipe.tokenizer, captions, truncation=True)
    v_prediction = pipe.scheduler.config.get("prediction_type") == "v_prediction"
    constants = (jnp.int32(first_id), jnp.float32(pipe.vae.config.scaling_factor),
                 jnp.asarray(pipe.scheduler.alphas_cumprod(), jnp.float32))
    # the token table apart from the rest of the encoder: the loss writes the learned rows into it
    models = (*pipe.unet_parts, *nnx.split(pipe.text_encoder, nnx.PathContains("token_embedding"), ...))
    optimizer = _optimizer(learning_rate)
    rows = jnp.asarray(init)
    opt_state = optimizer.init(rows)
    sharding = _data_sharding(batch_size)
    rng, key = np.random.default_rng(seed), jax.random.key(seed)
    every = (caption_ids[np.arange(len(mean)) % len(captions)], constants[0], mean, logvar, *constants[1:])
    loss_before = _fixed_loss(rows, models, every, jax.random.key(seed + 1), v_prediction)
    losses = []
    for i in range(steps):
        pick, caption = rng.integers(0, len(mean), batch_size), rng.integers(0, len(captions), batch_size)
        ids, m, lv = (jax.device_put(x, sharding) for x in (caption_ids[caption], mean[pick], logvar[pick]))
        rows, opt_state, loss = _step(rows, opt_state, models, (ids, constants[0], m, lv, *constants[1:]),
                                      jax.random.fold_in(key, i), optimizer, v_prediction)
        losses.append(loss)
    loss_after = _fixed_loss(rows, models, every, jax.random.key(seed + 1), v_prediction)
    learned = np.asarray(rows, np.float32)
    _set_rows(pipe.text_encoder, first_id, learned)
    pipe.conditioning.refresh()
    return LearnResult(placeholder_token, learned, np.asarray(jax.device_get(losses), np.float32),
                       float(loss_before), float(loss_after))


@functools.cache
def _optimizer(learning_rate: float) -> optax.GradientTransformation:
    return optax.adamw(learning_rate, weight_decay=1e-2)  # one object per rate: the step compiles once


def _data_sharding(batch_size: int):
    devices = jax.local_devices()
    n = len(devices) if batch_size % len(devices) == 0 else 1
    mesh = jax.sharding.Mesh(np.asarray(devices[:n]), ("data",))
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))


def _set_rows(text_encoder, first_id: int, rows: np.ndarray) -> None:
    table = _token_embedding(text_encoder)
    table.weight = nnx.Param(table.weight[...].at[first_id:first_id + len(rows)].set(
        jnp.asarray(rows, table.weight.dtype)))
