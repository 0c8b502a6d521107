"""Train the `demo` model: a small text-to-image latent diffusion model on drawn shapes, with optax.

    python scripts/train_demo.py --out sega_jax/assets/demo          # the shipped model (defaults below)
    python scripts/train_demo.py --out /tmp/d --vae-steps 3 --unet-steps 3 --images 256   # a smoke run

Our own Flax NNX modules (sega_jax.models: AutoencoderKL, UNet2DConditionModel, CLIPTextModel with the
real CLIP tokenizer) are trained directly and written in diffusers' folder layout (fp16 safetensors), with
Stable Diffusion's DDIM scheduler config, so `load_pipeline(folder)` (and diffusers) read it.

1. VAE: reconstruction (MSE) + a small KL on the drawn scenes of `sega_jax.builtin.demo` (32x32 px, 8x8
latents). 2. The latents' scaling factor: 1 / their standard deviation, as SD's 0.18215.
3. UNet + text encoder: epsilon prediction on noised latents at random timesteps (SD's scaled-linear
   betas), min-SNR-5 loss weighting, captions with attributes dropped at random and 10% empty
   (classifier-free guidance), EMA weights written out. The text encoder trains only the token embeddings
   its captions use (a compact table); the other rows of the 49,408-token table keep their initial draw.

The shipped model: the defaults, `--vae-steps 1500 --unet-steps 12000` (3035 s on the idle 2-core VM,
2026-12-03; eps MSE 0.051); its figures are in BENCHMARKS.md section 9.

Everything is drawn from `--seed` (numpy for the data and the initial weights, jax.random for the noise),
so two runs on one machine write the same weights.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import sys
import time
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's sega_jax, not an installed one

from sega_jax.builtin import demo  # noqa: E402
from sega_jax.builtin.tiny import SD_DDIM, _config_dict, module_tensors, random_init  # noqa: E402
from sega_jax.models.clip import CLIPTextModel  # noqa: E402
from sega_jax.models.tokenizer import clip_tokenizer, offline_clip_tokenizer, tokenize  # noqa: E402
from sega_jax.models.unet import UNet2DConditionModel  # noqa: E402
from sega_jax.models.vae import AutoencoderKL  # noqa: E402

KL_WEIGHT = 1e-4
MIN_SNR = 5.0


def log(*args) -> None:
    print(*args, flush=True)


# -- VAE ----------------------------------------------------------------------------------------------------


# The optimisers are static arguments of the jitted steps: one object per setting, so that a second run
# in the same process (the reproducibility test) reuses the compiled steps.
@functools.cache
def _vae_optimizer(steps: int) -> optax.GradientTransformation:
    schedule = optax.warmup_cosine_decay_schedule(0.0, 2e-3, max(1, steps // 20), max(2, steps), 1e-4)
    return optax.chain(optax.clip_by_global_norm(1.0), optax.adam(schedule))


@functools.cache
def _diffusion_optimizer(steps: int, lr: float) -> optax.GradientTransformation:
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, max(1, steps // 20), max(2, steps), lr / 20)
    return optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=1e-4))


@partial(jax.jit, static_argnums=(0, 1), donate_argnums=(2, 3))
def _vae_step(graph, optimizer, params, opt_state, images, key):
    def loss_fn(p):
        vae = nnx.merge(graph, p)
        mean, logvar = vae.encode(images)
        z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape)
        recon = vae.decode(z)
        mse = jnp.mean((recon - images) ** 2)
        kl = 0.5 * jnp.mean(mean**2 + jnp.exp(logvar) - 1.0 - logvar)
        return mse + KL_WEIGHT * kl, (mse, kl)

    (loss, (mse, kl)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, mse, kl


@partial(jax.jit, static_argnums=0)
def _vae_encode(graph, params, images):
    return nnx.merge(graph, params).encode(images)


def train_vae(images: np.ndarray, steps: int, batch: int, seed: int) -> AutoencoderKL:
    vae = random_init(lambda: AutoencoderKL(demo.DEMO_VAE, rngs=nnx.Rngs(0)), seed, jnp.float32)
    graph, params = nnx.split(vae, nnx.Param)
    optimizer = _vae_optimizer(steps)
    opt_state = optimizer.init(params)
    rng = np.random.default_rng(seed)
    key = jax.random.key(seed)
    start = time.perf_counter()
    for step in range(steps):
        idx = rng.integers(0, len(images), batch)
        x = jnp.asarray(images[idx], jnp.float32) / 127.5 - 1.0
        params, opt_state, mse, kl = _vae_step(graph, optimizer, params, opt_state, x,
                                               jax.random.fold_in(key, step))
        if step % 50 == 0 or step == steps - 1:
            log(f"vae step {step:5d}  mse {float(mse):.5f}  kl {float(kl):.3f}  "
                f"{time.perf_counter() - start:.0f} s")
    nnx.update(vae, params)
    return vae


def encode_all(vae: AutoencoderKL, images: np.ndarray, chunk: int = 512) -> tuple[np.ndarray, np.ndarray]:
    graph, params = nnx.split(vae, nnx.Param)
    means, logvars = [], []
    for i in range(0, len(images), chunk):
        mean, logvar = _vae_encode(graph, params, jnp.asarray(images[i:i + chunk], jnp.float32) / 127.5 - 1.0)
        means.append(np.asarray(mean))
        logvars.append(np.asarray(logvar))
    return np.concatenate(means), np.concatenate(logvars)


# -- UNet + text encoder ------------------------------------------------------------------------------------


def caption_vocabulary(tokenizer) -> np.ndarray:
    """Every token id the training captions can contain (sorted), BOS / EOS (= padding) included."""
    words = [*demo.SHAPES, "shape", *demo.COLOURS, *demo.BACKGROUNDS, *demo.SIZES, *demo.POSITIONS,
             "a", "on", "background", ","]
    texts = [*words, demo.caption("circle", "red", "white", "small", "top left"), ""]
    return np.unique(tokenize(tokenizer, texts))


def alphas_cumprod() -> np.ndarray:
    betas = np.linspace(SD_DDIM["beta_start"] ** 0.5, SD_DDIM["beta_end"] ** 0.5,
                        SD_DDIM["num_train_timesteps"], dtype=np.float64) ** 2
    return np.cumprod(1.0 - betas).astype(np.float32)


@partial(jax.jit, static_argnums=(0, 1), donate_argnums=(2, 3, 4))
def _diffusion_step(graph, optimizer, params, ema, opt_state, x0, ids, t, noise, abar, ema_decay):
    a = abar[t][:, None, None, None]
    xt = jnp.sqrt(a) * x0 + jnp.sqrt(1.0 - a) * noise
    snr = abar[t] / (1.0 - abar[t])
    weight = jnp.minimum(snr, MIN_SNR) / snr

    def loss_fn(p):
        unet, text = nnx.merge(graph, p)
        eps = unet(xt, t, text(ids))
        per_sample = jnp.mean((eps - noise) ** 2, axis=(1, 2, 3))
        return jnp.mean(weight * per_sample), jnp.mean(per_sample)

    (loss, mse), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    ema = jax.tree.map(lambda e, p: ema_decay * e + (1.0 - ema_decay) * p, ema, params)
    return params, ema, opt_state, loss, mse


def train_diffusion(latents: tuple[np.ndarray, np.ndarray], scenes: list, steps: int, batch: int, seed: int,
                    lr: float = 1e-3):
    """Returns the EMA UNet, the compact-vocabulary text encoder and the vocabulary (token ids)."""
    tokenizer = clip_tokenizer(model_max_length=demo.MAX_TOKENS)
    vocab = caption_vocabulary(tokenizer)
    compact = np.full(demo.DEMO_TEXT.vocab_size, -1, np.int64)
    compact[vocab] = np.arange(len(vocab))
    text_config = dataclasses.replace(demo.DEMO_TEXT, vocab_size=len(vocab))
    unet = random_init(lambda: UNet2DConditionModel(demo.DEMO_UNET, rngs=nnx.Rngs(0)), seed + 2, jnp.float32)
    text = random_init(lambda: CLIPTextModel(text_config, rngs=nnx.Rngs(0)), seed + 3, jnp.float32)
    pair = nnx.List([unet, text])
    graph, params = nnx.split(pair, nnx.Param)
    n_params = sum(x.size for x in jax.tree.leaves(params))
    log(f"unet + text encoder (compact vocabulary of {len(vocab)} tokens): {n_params / 1e6:.2f} M parameters")
    optimizer = _diffusion_optimizer(steps, lr)
    opt_state = optimizer.init(params)
    ema = jax.tree.map(jnp.copy, params)
    abar = jnp.asarray(alphas_cumprod())
    means, logvars = latents
    rng = np.random.default_rng(seed + 4)
    key = jax.random.key(seed + 5)
    token_cache: dict[str, np.ndarray] = {}

    def ids_of(texts):
        missing = [c for c in set(texts) if c not in token_cache]
        if missing:
            for c, row in zip(missing, tokenize(tokenizer, missing), strict=True):
                token_cache[c] = compact[row]
        return np.stack([token_cache[c] for c in texts]).astype(np.int32)

    start, losses = time.perf_counter(), []
    for step in range(steps):
        idx = rng.integers(0, len(means), batch)
        ids = ids_of([demo.random_caption(scenes[i], rng) for i in idx])
        t = rng.integers(0, len(abar), batch).astype(np.int32)
        k1, k2 = jax.random.split(jax.random.fold_in(key, step))
        x0 = means[idx] + np.exp(0.5 * logvars[idx]) * np.asarray(jax.random.normal(k1, means[idx].shape))
        noise = jax.random.normal(k2, x0.shape)
        decay = min(0.999, (1.0 + step) / (10.0 + step))
        params, ema, opt_state, loss, mse = _diffusion_step(graph, optimizer, params, ema, opt_state,
                                                            jnp.asarray(x0), jnp.asarray(ids), jnp.asarray(t),
                                                            noise, abar, jnp.float32(decay))
        losses.append(float(mse))
        if step % 100 == 0 or step == steps - 1:
            recent = float(np.mean(losses[-100:]))
            log(f"unet step {step:5d}  eps mse {recent:.4f} (mean of last {min(100, len(losses))})  "
                f"{time.perf_counter() - start:.0f} s")
    nnx.update(pair, ema)
    return unet, text, vocab, float(np.mean(losses[-100:]))


# -- writing the folder -------------------------------------------------------------------------------------


def _write(folder: Path, tensors: dict[str, np.ndarray], config: dict, weights_name: str) -> None:
    from safetensors.numpy import save_file

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    save_file({k: np.ascontiguousarray(v.astype(np.float16)) for k, v in sorted(tensors.items())},
              str(folder / weights_name))


def full_text_tensors(text: CLIPTextModel, vocab: np.ndarray, seed: int) -> dict[str, np.ndarray]:
    """The compact text encoder's tensors with its token table spread into the full 49,408 rows (the
    unused rows drawn as the initialiser draws them, N(0, 0.02), from `seed`)."""
    tensors = module_tensors(text)
    key = "text_model.embeddings.token_embedding.weight"
    table = 0.02 * np.random.default_rng(seed).standard_normal(
        (demo.DEMO_TEXT.vocab_size, demo.DEMO_TEXT.hidden_size), dtype=np.float32)
    table[vocab] = tensors[key]
    tensors[key] = table
    return tensors


def save_demo(folder: Path, vae, unet, text, vocab, scaling_factor: float, seed: int,
              info: dict | None = None) -> Path:
    folder = Path(folder)
    vae_config = {**_config_dict(dataclasses.replace(demo.DEMO_VAE, scaling_factor=scaling_factor),
                                 "AutoencoderKL")}
    _write(folder / "vae", module_tensors(vae), vae_config, "diffusion_pytorch_model.safetensors")
    _write(folder / "unet", module_tensors(unet), _config_dict(demo.DEMO_UNET, "UNet2DConditionModel"),
           "diffusion_pytorch_model.safetensors")
    text_config = {**dataclasses.asdict(demo.DEMO_TEXT), "architectures": ["CLIPTextModel"],
                   "model_type": "clip_text_model"}
    text_config.pop("use_attention_mask")
    _write(folder / "text_encoder", full_text_tensors(text, vocab, seed + 6), text_config,
           "model.safetensors")
    offline_clip_tokenizer(folder / "tokenizer", model_max_length=demo.MAX_TOKENS)
    (folder / "scheduler").mkdir(parents=True, exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(SD_DDIM, indent=2) + "\n")
    index = {"_class_name": "SemanticStableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
             "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "CLIPTextModel"],
             "tokenizer": ["transformers", "CLIPTokenizer"], "scheduler": ["diffusers", "DDIMScheduler"],
             "safety_checker": [None, None], "feature_extractor": [None, None]}
    (folder / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    if info is not None:
        (folder / "training.json").write_text(json.dumps(info, indent=2) + "\n")
    return folder


# -- entry point --------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="sega_jax/assets/demo", help="the diffusers folder to write")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--images", type=int, default=16384, help="drawn scenes in the training set")
    p.add_argument("--vae-steps", type=int, default=1500)
    p.add_argument("--vae-batch", type=int, default=32)
    p.add_argument("--unet-steps", type=int, default=12000)
    p.add_argument("--unet-batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3, help="the UNet's and text encoder's peak learning rate")
    return p


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    t0 = time.perf_counter()
    images, scenes = demo.dataset(args.images, args.seed)
    log(f"drew {len(images)} scenes ({images.shape[1]}x{images.shape[2]} px) "
        f"in {time.perf_counter() - t0:.1f} s")
    t1 = time.perf_counter()
    vae = train_vae(images, args.vae_steps, args.vae_batch, args.seed)
    vae_seconds = time.perf_counter() - t1
    means, logvars = encode_all(vae, images)
    scaling_factor = float(1.0 / np.std(means))
    log(f"latents {means.shape[1:]}: std {np.std(means):.4f}, mean posterior std "
        f"{float(np.mean(np.exp(0.5 * logvars))):.4f} -> scaling_factor {scaling_factor:.5f}")
    # the VAE's reconstruction error on the whole set, in pixel units (0..255)
    graph, params = nnx.split(vae, nnx.Param)
    recon = np.asarray(jax.jit(lambda p, z: nnx.merge(graph, p).decode(z))(params, jnp.asarray(means[:512])))
    vae_error = float(np.mean(np.abs((recon + 1.0) * 127.5 - images[:512].astype(np.float32))))
    log(f"vae mean |error| on 512 scenes: {vae_error:.2f} / 255")
    t2 = time.perf_counter()
    scaled = (means * scaling_factor, logvars + 2 * np.log(scaling_factor))
    unet, text, vocab, unet_mse = train_diffusion(scaled, scenes, args.unet_steps, args.unet_batch, args.seed,
                                                  args.lr)
    unet_seconds = time.perf_counter() - t2
    info = {"command": "python scripts/train_demo.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "seed": args.seed, "images": args.images, "vae_steps": args.vae_steps,
            "unet_steps": args.unet_steps,
            "vae_batch": args.vae_batch, "unet_batch": args.unet_batch, "vae_seconds": round(vae_seconds, 1),
            "unet_seconds": round(unet_seconds, 1), "vae_mean_abs_error_255": round(vae_error, 3),
            "unet_final_eps_mse": round(unet_mse, 5), "scaling_factor": scaling_factor,
            "jax": jax.__version__, "optax": optax.__version__}
    save_demo(Path(args.out), vae, unet, text, vocab, scaling_factor, args.seed, info)
    info["total_seconds"] = round(time.perf_counter() - t0, 1)
    (Path(args.out) / "training.json").write_text(json.dumps(info, indent=2) + "\n")
    log(f"wrote {args.out} in {info['total_seconds']:.0f} s: {json.dumps(info)}")
    return info


if __name__ == "__main__":
    main()
