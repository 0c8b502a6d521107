"""Flax NNX modules, one readable file per model (`unet`, `vae`, `clip`, `safety_checker`, with their layers,
attention and placement helpers), their weight maps from diffusers checkpoints (`weights`), the CLIP
tokenizer and image processor. Knows nothing of guidance, samplers or pipelines: may import `runtime` only.
"""
