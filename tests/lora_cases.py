"""What the LoRA tests share: random peft LoRAs, peft-applied torch twins, kohya-format files, and our
pipeline and diffusers' run on the same latents."""

from __future__ import annotations

import copy

import numpy as np
import torch
from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
from peft.utils import get_peft_model_state_dict

STEPS = 3
TE_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
TE_CFG = LoraConfig(r=2, lora_alpha=4, init_lora_weights=False, target_modules=TE_TARGETS)


def random_lora(module, config: LoraConfig, seed: int) -> dict[str, torch.Tensor]:
    """A random peft LoRA for `module` (peft's keys, without adapter name); it changes the latents by ~50%."""
    module = copy.deepcopy(module)
    torch.manual_seed(seed)
    inject_adapter_in_model(config, module, adapter_name="tmp")
    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(module, adapter_name="tmp").items()}


def with_peft(module, config: LoraConfig, state: dict):
    """A copy of `module` with the LoRA applied by peft (the torch side's text encoders)."""
    module = copy.deepcopy(module)
    inject_adapter_in_model(config, module, adapter_name="x")
    result = set_peft_model_state_dict(module, state, adapter_name="x")
    assert not result.unexpected_keys
    return module


def clip_name(module: str) -> str:
    """transformers 5 leaves `text_model.` off CLIPTextModel's module paths; kohya's names have it."""
    return module if module.startswith("text_model.") else f"text_model.{module}"


def kohya(prefix: str, state: dict, alpha: float, rename=lambda m: m) -> dict[str, torch.Tensor]:
    """peft keys in kohya's format: `<prefix><flat module>.lora_down.weight / lora_up.weight / alpha`."""
    out = {}
    for key, value in state.items():
        module, role = key.rsplit(".lora_", 1)
        flat = prefix + rename(module).replace(".", "_")
        out[f"{flat}.{'lora_down' if role.startswith('A') else 'lora_up'}.weight"] = value
        out[f"{flat}.alpha"] = torch.tensor(float(alpha))
    return out


def noise(batch: int = 1) -> np.ndarray:
    return np.random.default_rng(0).standard_normal((batch, 4, 8, 8), dtype=np.float32)


KW = dict(prompt="a photo of a cat", num_inference_steps=STEPS, height=16, width=16, output_type="latent")


def run_ours(pipe, **kw) -> np.ndarray:
    return np.asarray(pipe(**{**KW, "latents": noise(), **kw}).images)


def run_torch(pipe) -> np.ndarray:
    pipe.set_progress_bar_config(disable=True)
    return pipe(latents=torch.from_numpy(noise()), **KW).images.numpy()
