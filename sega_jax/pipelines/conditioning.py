"""Text conditioning, one component per family, held by both the SEGA and the LEDITS++ pipeline of a family.

- `SDConditioning` (SD 1.x/2.x): one CLIP text encoder; prompts, SEGA's negative prompts and concepts.
- `SDXLConditioning`: diffusers' `StableDiffusionXLPipeline.encode_prompt` line for line: both encoders'
  penultimate hidden states side by side, the second encoder's projected pooled output, zeros for an
  absent negative prompt when the folder says `force_zeros_for_empty_prompt`, and the micro-conditioning
  time ids (`micro_conditioning_ids`: original size, crop, target size).

A component holds its tokenizer(s), text encoder(s) and their `nnx.split`s (`split`, `split_2`; `refresh`
re-splits them after LoRA or textual inversion changed the weights) and runs the compiled encode programs
(`encode_text`, `encode_text_xl`). Its `concepts` and `context` are what the SEGA loop needs from a family
(the copies [uncond, text, concept 0, ...]); LEDITS++ builds its own copies from `encode`, `negative`,
`zeros` and `concept_embeddings`. The pipelines expose the components' parts as their diffusers attributes
(`text_encoder`, `tokenizer`, ...) through `delegated`.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sega_jax.models.tokenizer import tokenize
from sega_jax.pipelines import inputs
from sega_jax.runtime import xla_options

Array = jax.Array


@xla_options.jit(static_argnames=("graph", "clip_skip"))
def encode_text(graph, state, ids, clip_skip=None):
    """A CLIP text encoder's hidden states for token ids (B, L), `clip_skip` layers before the last."""
    return nnx.merge(graph, state)(ids, clip_skip=clip_skip)


@xla_options.jit(static_argnames=("graphs", "clip_skip"))
def encode_text_xl(graphs, states, ids, ids_2, clip_skip=None):
    """{"context": both encoders' hidden states concatenated, "text_embeds": encoder 2's projection}."""
    first = nnx.merge(graphs[0], states[0]).encode_for_sdxl(ids, clip_skip=clip_skip)
    second = nnx.merge(graphs[1], states[1]).encode_for_sdxl(ids_2, clip_skip=clip_skip)
    hidden = jnp.concatenate([first.prompt_embeds, second.prompt_embeds.astype(first.prompt_embeds.dtype)],
                             axis=-1)
    return {"context": hidden, "text_embeds": second.text_embeds}


def delegated(name: str, doc: str = "", *, settable: bool = True) -> property:
    """A pipeline attribute that is its conditioning component's `name`; setting it re-splits the encoders."""

    def get(pipe):
        return getattr(pipe.conditioning, name)

    def set_(pipe, value) -> None:
        setattr(pipe.conditioning, name, value)
        pipe.conditioning.refresh()

    return property(get, set_ if settable else None, doc=doc or f"The conditioning component's `{name}`.")


def _state_dtype(split: tuple):
    return jax.tree.leaves(split[1])[0].dtype


class SDConditioning:
    """SD 1.x/2.x text conditioning: one tokenizer and CLIP text encoder."""

    def __init__(self, text_encoder, tokenizer):
        self.text_encoder, self.tokenizer = text_encoder, tokenizer
        self.refresh()

    def refresh(self) -> None:
        """Re-split the text encoder after its parameters changed (LoRA, new token rows)."""
        self.split = nnx.split(self.text_encoder)

    def encode(self, texts: list[str], *, truncation: bool = False, clip_skip: int | None = None) -> Array:
        """Hidden states (B, L, D); `truncation`: see `tokenize` (False: diffusers' prompt path)."""
        ids = tokenize(self.tokenizer, texts, truncation=truncation)
        return encode_text(self.split[0], self.split[1], jnp.asarray(ids), clip_skip=clip_skip or None)

    def concept_embeddings(self, embeddings, name: str) -> Array:
        """Given concept embeddings, checked: (K >= 1, L, D) float32."""
        array = np.asarray(embeddings, np.float32)
        expected = (self.tokenizer.model_max_length, self.text_encoder.config.hidden_size)
        if array.ndim != 3 or array.shape[0] < 1 or tuple(array.shape[1:]) != expected:
            raise ValueError(f"`{name}` must have shape (num_concepts, {expected[0]}, {expected[1]}), got "
                             f"{tuple(array.shape)}")
        return jnp.asarray(array)

    def concepts(self, editing_prompt, embeddings, clip_skip: int | None = None) -> Array | None:
        """SEGA's concepts: one embedding per concept (K, L, D); `context` pairs each with every image."""
        if editing_prompt is not None and embeddings is not None and len(editing_prompt):
            raise ValueError("pass either `editing_prompt` or `editing_prompt_embeddings`, not both")
        if editing_prompt:
            return self.encode(inputs.prompt_list(editing_prompt, "editing_prompt"), clip_skip=clip_skip)
        if embeddings is not None:
            return self.concept_embeddings(embeddings, "editing_prompt_embeddings")
        return None

    def context(self, prompts, negative_prompt, prompt, per_prompt, do_cfg, concepts, size) -> Array:
        """SEGA's copies (copies, B, L, D): [uncond, text, concept 0, ...], each for every image.

        Each concept is paired with every image, like the reference's tokenised path. (Deviation: the
        reference's `editing_prompt_embeddings` path repeats concept-major and mispairs for several prompts.)
        """
        text = jnp.repeat(self.encode(prompts), per_prompt, axis=0)
        if not do_cfg:
            return text[None]
        negatives = inputs.negative_prompts(negative_prompt, prompt, len(prompts))
        uncond = jnp.repeat(self.encode(negatives, truncation=True), per_prompt, axis=0)
        parts = [uncond[None], text[None]]
        if concepts is not None:
            parts.append(
                jnp.broadcast_to(concepts[:, None].astype(text.dtype), (concepts.shape[0], *text.shape))
            )
        return jnp.concatenate(parts)


class SDXLConditioning:
    """SDXL text conditioning: two tokenizers and CLIP text encoders, pooled embeddings and time ids."""

    def __init__(self, text_encoder, text_encoder_2, tokenizer, tokenizer_2, unet_config,
                 force_zeros_for_empty_prompt: bool = True):
        self.text_encoder, self.text_encoder_2 = text_encoder, text_encoder_2
        self.tokenizer, self.tokenizer_2 = tokenizer, tokenizer_2
        self.force_zeros_for_empty_prompt = bool(force_zeros_for_empty_prompt)
        self.context_dim = unet_config.cross_attention_dim[0]  # both encoders' hidden sizes together
        passed = unet_config.addition_time_embed_dim * 6 + text_encoder_2.config.projection_dim
        if passed != unet_config.projection_class_embeddings_input_dim:
            raise ValueError(f"Model expects an added time embedding vector of length "
                             f"{unet_config.projection_class_embeddings_input_dim}, but a vector of {passed} "
                             "was created: check `unet.config.addition_time_embed_dim` and "
                             "`text_encoder_2.config.projection_dim`")
        self.refresh()

    def refresh(self) -> None:
        """Re-split the text encoders after their parameters changed (LoRA, new token rows)."""
        self.split, self.split_2 = nnx.split(self.text_encoder), nnx.split(self.text_encoder_2)

    def encode(self, texts: list[str], texts_2: list[str], clip_skip: int | None = None) -> dict:
        """{"context": (B, L, D) both encoders' hidden states, "text_embeds": (B, P) encoder 2's pooled
        projection}."""
        ids = tokenize(self.tokenizer, texts, truncation=True)
        ids_2 = tokenize(self.tokenizer_2, texts_2, truncation=True)
        graphs, states = (self.split[0], self.split_2[0]), (self.split[1], self.split_2[1])
        return encode_text_xl(graphs, states, jnp.asarray(ids), jnp.asarray(ids_2), clip_skip=clip_skip)

    def zeros(self, batch: int) -> dict:
        """Zero conditioning of the encoders' shapes (what `negative` gives for an absent prompt)."""
        hidden = (batch, self.tokenizer.model_max_length, self.context_dim)
        return {"context": jnp.zeros(hidden, _state_dtype(self.split)),
                "text_embeds": jnp.zeros((batch, self.text_encoder_2.config.projection_dim),
                                         _state_dtype(self.split_2))}

    def negative(self, negative_prompt, negative_prompt_2, prompts: list[str], text: dict) -> dict:
        """diffusers' negative branch: zeros (like `text`) when no negative prompt is given and the folder
        asks for it; else both encoders on the negative prompts (penultimate layer, never clip-skipped)."""
        if negative_prompt is None and self.force_zeros_for_empty_prompt:
            return {key: jnp.zeros_like(text[key]) for key in ("context", "text_embeds")}
        # diffusers' SDXL broadcasts a string over the batch before comparing types with the prompt list.
        batch = len(text["context"])
        listed = lambda p: [p] * batch if isinstance(p, str) else p
        negatives = inputs.negative_prompts(listed(negative_prompt or ""), prompts, batch)
        negative_2 = listed(negative_prompt_2 or negative_prompt or "")
        negatives_2 = inputs.negative_prompts(negative_2, prompts, batch)
        return self.encode(negatives, negatives_2)

    @staticmethod
    def concept_embeddings(hidden, pooled) -> dict | None:
        """Given concept embeddings as one pytree, or None; SDXL needs both parts."""
        if hidden is None and pooled is None:
            return None
        if hidden is None or pooled is None:
            raise ValueError("SDXL concepts need both `editing_prompt_embeddings` (K, 77, hidden of both "
                             "encoders) and `editing_pooled_prompt_embeds` (K, projection_dim)")
        return {"context": hidden, "text_embeds": pooled}

    def concepts(self, editing_prompt, embeddings: dict | None, clip_skip: int | None = None) -> dict | None:
        """One conditioning per concept, {"context": (K, L, D), "text_embeds": (K, P)}, from the editing
        prompts or the `concept_embeddings` (checked)."""
        if editing_prompt is not None and embeddings is not None and len(editing_prompt):
            raise ValueError("pass either `editing_prompt` or `editing_prompt_embeddings`, not both")
        if editing_prompt:
            texts = inputs.prompt_list(editing_prompt, "editing_prompt")
            return self.encode(texts, texts, clip_skip)
        if embeddings is None:
            return None
        num = np.shape(embeddings["context"])[0] if np.ndim(embeddings["context"]) else 0
        expected = (max(num, 1), self.tokenizer.model_max_length, self.context_dim)
        hidden = inputs.check_array(embeddings["context"], "editing_prompt_embeddings", expected)
        pooled = inputs.check_array(embeddings["text_embeds"], "editing_pooled_prompt_embeds",
                                    (hidden.shape[0], self.text_encoder_2.config.projection_dim))
        return {"context": jnp.asarray(hidden), "text_embeds": jnp.asarray(pooled)}

    def context(self, prompts, negative_prompt, prompt, per_prompt, do_cfg, concepts, size, *,
                prompt_2=None, negative_prompt_2=None, original_size=None, crops_coords_top_left=(0, 0),
                target_size=None, negative_original_size=None, negative_crops_coords_top_left=(0, 0),
                negative_target_size=None, clip_skip=None) -> dict:
        """SEGA's copies {"context": (copies, B, L, D), "text_embeds": (copies, B, P), "time_ids":
        (copies, B, 6)}: [uncond, text, concept 0, ...], each for every image. Each concept has its own
        hidden states and pooled embedding and the prompt's time ids, as diffusers' LEDITS++ for SDXL."""
        prompts_2 = inputs.prompt_list(prompt_2, "prompt_2") if prompt_2 else prompts
        if len(prompts_2) != len(prompts):
            raise ValueError(f"`prompt_2` has {len(prompts_2)} entries for {len(prompts)} prompts")
        time_ids = micro_conditioning_ids(original_size or size, crops_coords_top_left, target_size or size,
                                          "")
        text = self.encode(prompts, prompts_2, clip_skip)
        text["time_ids"] = jnp.broadcast_to(time_ids, (len(prompts), 6))
        copies = [text]
        if do_cfg:
            uncond = self.negative(negative_prompt, negative_prompt_2, prompts, text)
            uncond["time_ids"] = text["time_ids"]
            if negative_original_size is not None and negative_target_size is not None:
                negative_ids = micro_conditioning_ids(negative_original_size, negative_crops_coords_top_left,
                                                      negative_target_size, "negative_")
                uncond["time_ids"] = jnp.broadcast_to(negative_ids, text["time_ids"].shape)
            copies = [uncond, text]
        # (copies, B, ...): each copy repeated per image, then every concept paired with every image.
        stacked = jax.tree.map(lambda *xs: jnp.repeat(jnp.stack(xs), per_prompt, axis=1), *copies)
        if concepts is None or not do_cfg:
            return stacked
        concepts = dict(concepts, time_ids=jnp.broadcast_to(time_ids, (len(concepts["context"]), 6)))
        tiled = jax.tree.map(
            lambda c, s: jnp.broadcast_to(c[:, None].astype(s.dtype), (c.shape[0], *s.shape[1:])),
            concepts, stacked)
        return jax.tree.map(lambda s, c: jnp.concatenate([s, c]), stacked, tiled)


def micro_conditioning_ids(original_size, crops_coords_top_left, target_size, prefix: str) -> Array:
    """SDXL's six micro-conditioning ids: original (h, w), crop (top, left), target (h, w)."""
    values: list[Any] = []
    for name, value in (("original_size", original_size), ("crops_coords_top_left", crops_coords_top_left),
                        ("target_size", target_size)):
        pair = list(value) if isinstance(value, (tuple, list, np.ndarray)) else None
        if pair is None or len(pair) != 2:
            raise ValueError(f"`{prefix}{name}` must be a pair of numbers, got {value!r}")
        values += [inputs.check_number(v, f"{prefix}{name}") for v in pair]
    return jnp.asarray(values, jnp.float32)
