"""What the CLIP text-encoder tests share: tiny SD 1.x / 2.x twins built in transformers with every
parameter random, pipeline-shaped token ids, and the functions behind the fixtures that save and load them."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from sega_jax.models.clip import load_text_encoder

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
safetensors_numpy = pytest.importorskip("safetensors.numpy")

FP32_BOUND = 1e-4
BF16_BOUND = 3e-2

# Tiny twins of SD 1.x (OpenAI CLIP: quick_gelu, pad = eos) and SD 2.x (OpenCLIP: exact gelu, 3 heads of
# 16, pad = "!" = id 0) text encoders. Sequences are max_position_embeddings long, as the pipeline pads them.
SD1 = dict(vocab_size=1000, hidden_size=32, intermediate_size=37, num_hidden_layers=3, num_attention_heads=4,
           max_position_embeddings=16, hidden_act="quick_gelu", layer_norm_eps=1e-5,
           bos_token_id=998, eos_token_id=999, pad_token_id=999, projection_dim=24)
SD2 = dict(vocab_size=1000, hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=3,
           max_position_embeddings=16, hidden_act="gelu", layer_norm_eps=1e-6,
           bos_token_id=998, eos_token_id=999, pad_token_id=0, projection_dim=24)
CONFIGS = {"sd1": SD1, "sd2": SD2}


def make_torch_model(cfg: dict, seed: int, cls_name: str = "CLIPTextModel"):
    """A transformers text encoder with every parameter random (layer norms and biases included)."""
    torch.manual_seed(seed)
    model = getattr(transformers, cls_name)(transformers.CLIPTextConfig(**cfg)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
            elif "embedding" in name:
                p.copy_(0.5 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) / math.sqrt(p.shape[1]))
    return model


def pipeline_ids(cfg: dict, seed: int = 0, seq_len: int | None = None) -> np.ndarray:
    """Token ids shaped like the pipeline's: BOS, words, EOS, padding; one over-long row cut (no EOS)."""
    rng = np.random.default_rng(seed)
    seq_len = seq_len or cfg["max_position_embeddings"]
    bos, eos, pad = cfg["bos_token_id"], cfg["eos_token_id"], cfg["pad_token_id"]
    rows = []
    for n_words in (0, 3, seq_len - 2, seq_len + 5):
        row = [bos, *rng.integers(1, cfg["vocab_size"] - 2, n_words).tolist(), eos][:seq_len]
        rows.append(row + [pad] * (seq_len - len(row)))
    return np.asarray(rows, dtype=np.int64)


def torch_forward(model, ids: np.ndarray, attention_mask: np.ndarray | None = None, **kwargs):
    with torch.no_grad():
        mask = None if attention_mask is None else torch.from_numpy(attention_mask)
        return model(torch.from_numpy(ids), attention_mask=mask, **kwargs)


def save_twins(tmp_path_factory):
    """name -> (torch model, folder it was saved to with save_pretrained)."""
    out = {}
    for seed, (name, cfg) in enumerate(CONFIGS.items()):
        model = make_torch_model(cfg, seed)
        folder = tmp_path_factory.mktemp(name) / "text_encoder"
        model.save_pretrained(folder)
        out[name] = (model, folder)
    return out


def load_twins(saved):
    return {name: load_text_encoder(folder) for name, (_, folder) in saved.items()}


def copy_sd1(saved, tmp_path) -> Path:
    folder = tmp_path / "text_encoder"
    shutil.copytree(saved["sd1"][1], folder)
    return folder


def rewrite_weights(path: Path, edit) -> None:
    tensors = dict(safetensors_numpy.load_file(str(path)))
    edit(tensors)
    safetensors_numpy.save_file(tensors, str(path))
