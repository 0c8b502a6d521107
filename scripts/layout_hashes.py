"""Hashes of a fixed set of outputs, to show a refactor changed no number (issue 35).

    python scripts/layout_hashes.py FIXTURES_DIR > hashes.json

Runs SD (with edits, and with a LoRA), SDXL, LEDITS++ (invert and edit), null-text inversion, a sweep and the
demo CLI through the public API and the `sega-jax` command, and prints the SHA-256 of each output's raw bytes.
The fixtures (tiny random diffusers folders and a LoRA file, built with torch) are written once into
FIXTURES_DIR and reused, so a run before and a run after a change see the same files.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

PROMPT = "a photo of the face of a woman"
EDITS = dict(editing_prompt=["smiling, smile", "glasses"], edit_guidance_scale=[4.0, 5.0],
             edit_threshold=[0.9, 0.8], edit_warmup_steps=[1, 0], reverse_editing_direction=[False, True])


def digest(*arrays) -> str:
    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(np.asarray(a))
        h.update(str(a.dtype).encode() + str(a.shape).encode() + a.tobytes())
    return h.hexdigest()


def png_pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def smooth_photo(size: int, seed: int = 0) -> Image.Image:
    coarse = np.random.default_rng(seed).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    return Image.fromarray(coarse).resize((size, size), Image.BICUBIC)


def build_fixtures(root: Path) -> None:
    from safetensors.numpy import save_file

    from sega_jax.testing.reference import save_reference, save_reference_xl

    if not (root / "sd").exists():
        save_reference(root / "sd")
    if not (root / "sdxl").exists():
        save_reference_xl(root / "sdxl")
    rng = np.random.default_rng(0)
    tensors = {}
    for attn in ("attn1", "attn2"):
        for proj in ("to_q", "to_v"):
            key = f"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_{attn}_{proj}"
            tensors[f"{key}.lora_down.weight"] = rng.standard_normal((4, 32)).astype(np.float32) * 0.3
            tensors[f"{key}.lora_up.weight"] = rng.standard_normal((32, 4)).astype(np.float32) * 0.3
            tensors[f"{key}.alpha"] = np.array(4.0, np.float32)
    save_file(tensors, str(root / "lora.safetensors"))


def run_cli(*args: str) -> None:
    subprocess.run([sys.executable, "-c", "import sys; from sega_jax.cli import main; sys.exit(main())",
                   *args], check=True, capture_output=True)


def main() -> None:
    root = Path(sys.argv[1])
    root.mkdir(parents=True, exist_ok=True)
    if not (root / "lora.safetensors").exists():
        build_fixtures(root)
    from sega_jax import (
        LEditsPPPipelineStableDiffusion,
        SemanticStableDiffusionPipeline,
        load_pipeline,
    )

    out: dict[str, str] = {}
    sd = SemanticStableDiffusionPipeline.from_pretrained(root / "sd")
    sd.set_progress_bar_config(disable=True)
    small = dict(height=24, width=16, num_inference_steps=3, output_type="np")
    r = sd(prompt=[PROMPT, "a cat"], seed=0, **small, **EDITS)
    out["sd_sega"] = digest(r.images, *r.sem_guidance) if r.sem_guidance is not None else digest(r.images)
    r = sd(prompt=PROMPT, seed=1, eta=0.5, edit_momentum_scale=0.3, edit_mom_beta=0.6, **small, **EDITS)
    out["sd_sega_eta_momentum"] = digest(r.images)
    sd.load_lora_weights(str(root / "lora.safetensors"))
    out["sd_lora"] = digest(sd(prompt=PROMPT, seed=0, **small, **EDITS).images)
    sd.unload_lora_weights()

    photo = smooth_photo(32)
    inv = sd.invert(photo, prompt="a face", num_inference_steps=3, method="null-text")
    r = sd("a face", num_inference_steps=3, inversion=inv, output_type="np",
           editing_prompt=["smiling"], edit_guidance_scale=[3.0], edit_warmup_steps=[0])
    out["null_text"] = digest(r.images)

    xl = load_pipeline(root / "sdxl")
    xl.set_progress_bar_config(disable=True)
    r = xl(prompt=PROMPT, seed=0, height=24, width=16, num_inference_steps=3, output_type="np", **EDITS)
    out["sdxl_sega"] = digest(r.images)

    ed = LEditsPPPipelineStableDiffusion.from_pretrained(root / "sd")
    ed.set_progress_bar_config(disable=True)
    ed.invert(photo, source_prompt="a face", num_inversion_steps=4, skip=0.25, seed=0)
    r = ed(editing_prompt=["smiling", "glasses"], edit_guidance_scale=[5.0, 4.0], edit_threshold=[0.9, 0.8],
           reverse_editing_direction=[False, True], use_intersect_mask=False, output_type="np")
    out["ledits_sd"] = digest(r.images)

    sweep_dir = root / "out-sweep"
    if sweep_dir.exists():
        import shutil

        shutil.rmtree(sweep_dir)
    run_cli("sweep", "--model", str(root / "sd"), "--prompt", PROMPT, "--seeds", "0:2",
            "--editing-prompt", "smiling", "--grid", "edit_guidance_scale=[0,4]",
            "--set", "num_inference_steps=3", "--set", "height=16", "--set", "width=16",
            "--no-progress", "--out", str(sweep_dir))
    pngs = sorted(p for p in sweep_dir.rglob("*.png") if "sheet" not in p.name)
    out["sweep"] = digest(*[png_pixels(p) for p in pngs]) + f" ({len(pngs)} images)"

    demo = root / "demo.png"
    run_cli("generate", "--model", "demo", "--prompt", "a large red circle on a white background",
            "--seed", "3", "--steps", "4", "--edit", "a large blue circle on a white background@scale=8",
            "--out", str(demo))
    demo_pngs = sorted(p for p in root.glob("demo*.png"))
    out["demo_cli"] = digest(*[png_pixels(p) for p in demo_pngs])
    json.dump(out, sys.stdout, indent=1, sort_keys=True)
    print()


if __name__ == "__main__":
    main()
