"""The checkpoint loader's errors (`sega_jax.models.weights`, through the CLIP text encoder's folders): every
model goes through `load_model`, so these cover the whole project; they assert on what each message names:
the file, the tensor key, the shapes."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sega_jax.models.clip import CLIPTextConfig, CLIPTextModel, load_text_encoder
from sega_jax.models.weights import WeightLoadError
from tests.helpers import max_rel_diff

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
safetensors_numpy = pytest.importorskip("safetensors.numpy")


from tests.clip_cases import (  # noqa: E402
    FP32_BOUND,
    SD1,
    SD2,
    copy_sd1,
    pipeline_ids,
    rewrite_weights,
    save_twins,
    torch_forward,
)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    return save_twins(tmp_path_factory)


@pytest.fixture
def sd1_copy(saved, tmp_path):
    return copy_sd1(saved, tmp_path)


# ------------------------------------------------------------------ loader errors (sega_jax.models.weights)


def test_missing_folder(tmp_path):
    with pytest.raises(WeightLoadError, match="model folder not found") as err:
        load_text_encoder(tmp_path / "nope")
    assert str(tmp_path / "nope") in str(err.value)


def test_missing_or_invalid_config(sd1_copy):
    (sd1_copy / "config.json").write_text("{not json")
    with pytest.raises(WeightLoadError, match="not valid JSON") as err:
        load_text_encoder(sd1_copy)
    assert str(sd1_copy / "config.json") in str(err.value)
    (sd1_copy / "config.json").unlink()
    with pytest.raises(WeightLoadError, match="file not found") as err:
        load_text_encoder(sd1_copy)
    assert str(sd1_copy / "config.json") in str(err.value)


def test_no_weight_files(sd1_copy):
    (sd1_copy / "model.safetensors").unlink()
    with pytest.raises(WeightLoadError) as err:
        load_text_encoder(sd1_copy)
    msg = str(err.value)
    assert msg.startswith(f"{sd1_copy}: no weights found")
    assert "model.safetensors" in msg and "model.safetensors.index.json" in msg


def test_missing_tensor(sd1_copy):
    rewrite_weights(sd1_copy / "model.safetensors", lambda t: t.pop("encoder.layers.1.mlp.fc2.bias"))
    with pytest.raises(WeightLoadError) as err:
        load_text_encoder(sd1_copy)
    msg = str(err.value)
    assert msg.startswith(f"{sd1_copy}: ") and "missing tensor" in msg
    assert msg.endswith("text_model.encoder.layers.1.mlp.fc2.bias")  # that key and no other


def test_many_missing_tensors_are_summarised(sd1_copy):
    rewrite_weights(sd1_copy / "model.safetensors",
                    lambda t: [t.pop(k) for k in list(t) if k.startswith("encoder.layers.2.")])
    with pytest.raises(WeightLoadError, match=r"missing tensor.*and 8 more"):
        load_text_encoder(sd1_copy)


def test_unexpected_tensor(sd1_copy):
    path = sd1_copy / "model.safetensors"
    extra = "encoder.layers.0.self_attn.rotary.weight"
    rewrite_weights(path, lambda t: t.update({extra: np.zeros(4, np.float32)}))
    with pytest.raises(WeightLoadError) as err:
        load_text_encoder(sd1_copy)
    msg = str(err.value)
    assert msg.startswith(f"{path}: ") and "unexpected tensor" in msg
    assert "encoder.layers.0.self_attn.rotary.weight" in msg
    assert "missing" not in msg


@pytest.mark.parametrize("key, bad_shape, expected", [
    ("encoder.layers.0.mlp.fc1.weight", (36, 32), (37, 32)),       # linear: reported in torch's layout
    ("embeddings.token_embedding.weight", (999, 32), (1000, 32)),  # identity layout
    ("final_layer_norm.bias", (32, 1), (32,)),
])
def test_misshaped_tensor(sd1_copy, key, bad_shape, expected):
    path = sd1_copy / "model.safetensors"
    rewrite_weights(path, lambda t: t.update({key: np.zeros(bad_shape, np.float32)}))
    with pytest.raises(WeightLoadError) as err:
        load_text_encoder(sd1_copy)
    msg = str(err.value)
    assert msg.startswith(f"{path}: ")
    assert repr(key) in msg and f"shape {bad_shape}" in msg and f"expected {expected}" in msg


@pytest.mark.parametrize("corrupt, reason", [
    (lambda raw: raw[: len(raw) // 2], "needs bytes"),                  # truncated in the data
    (lambda raw: raw[:100], "header length"),                           # truncated in the header
    (lambda raw: raw[:5], "shorter than its 8-byte header length"),
    (lambda raw: raw[:8] + b"\xff" * 16 + raw[24:], "unreadable header"),
])
def test_corrupt_safetensors(sd1_copy, corrupt, reason):
    path = sd1_copy / "model.safetensors"
    path.write_bytes(corrupt(path.read_bytes()))
    with pytest.raises(WeightLoadError) as err:
        load_text_encoder(sd1_copy)
    msg = str(err.value)
    assert msg.startswith(f"{path}: corrupt safetensors file") and reason in msg


def test_pickled_bin_needs_opt_in(saved, sd1_copy):
    model, _ = saved["sd1"]
    (sd1_copy / "model.safetensors").unlink()
    bin_path = sd1_copy / transformers.utils.WEIGHTS_NAME  # transformers' name: pytorch_model.bin
    torch.save(model.state_dict(), bin_path)
    with pytest.raises(WeightLoadError) as err:
        load_text_encoder(sd1_copy)
    assert str(err.value).startswith(f"{bin_path}: ") and "allow_pickle=True" in str(err.value)
    ids = pipeline_ids(SD1, seed=16)
    out = load_text_encoder(sd1_copy, allow_pickle=True)(jnp.asarray(ids))
    assert max_rel_diff(out, torch_forward(model, ids).last_hidden_state) <= FP32_BOUND


def test_bad_dtype(saved):
    with pytest.raises(ValueError, match="dtype"):
        load_text_encoder(saved["sd1"][1], dtype="int8")
    with pytest.raises(ValueError, match="dtype"):
        load_text_encoder(saved["sd1"][1], dtype=jnp.int32)


def test_random_init_builds():
    model = CLIPTextModel(CLIPTextConfig(**{k: SD2[k] for k in (
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "max_position_embeddings", "hidden_act")}), rngs=nnx.Rngs(0))
    out = model(jnp.asarray(pipeline_ids(SD2)))
    assert out.shape == (4, 16, 48) and bool(jnp.isfinite(out).all())
