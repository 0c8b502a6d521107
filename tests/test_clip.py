"""CLIP text encoder against transformers (PyTorch), plus the checkpoint loader's errors (the tokenizer:
test_tokenizer.py). The loader-error tests cover `sega_jax.models.weights` for the whole project (every
model goes through `load_model`); they assert on what each message names: the file, the tensor key, shapes.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sega_jax.models.clip import CLIPTextConfig, load_text_encoder
from sega_jax.models.weights import WeightLoadError
from tests.helpers import max_rel_diff

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from tests.clip_cases import (  # noqa: E402
    BF16_BOUND,
    CONFIGS,
    FP32_BOUND,
    SD1,
    SD2,
    copy_sd1,
    load_twins,
    make_torch_model,
    pipeline_ids,
    rewrite_weights,
    safetensors_numpy,
    save_twins,
    torch_forward,
)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    return save_twins(tmp_path_factory)


@pytest.fixture(scope="module")
def loaded(saved):
    return load_twins(saved)


@pytest.fixture
def sd1_copy(saved, tmp_path):
    return copy_sd1(saved, tmp_path)




# --------------------------------------------------------------------------------------------- parity


@pytest.mark.parametrize("name", ["sd1", "sd2"])
def test_parity_fp32(name, saved, loaded):
    model, _ = saved[name]
    ours = loaded[name]
    ids = pipeline_ids(CONFIGS[name], seed=1)
    ref = torch_forward(model, ids).last_hidden_state.numpy()
    out = ours(jnp.asarray(ids))
    assert out.dtype == jnp.float32 and out.shape == ref.shape
    assert max_rel_diff(out, ref) <= FP32_BOUND
    short = pipeline_ids(CONFIGS[name], seed=2, seq_len=7)  # shorter than max_position_embeddings
    assert max_rel_diff(ours(jnp.asarray(short)), torch_forward(model, short).last_hidden_state) <= FP32_BOUND


def test_attention_mask_parity(saved, loaded):
    model, _ = saved["sd1"]
    ids = pipeline_ids(SD1, seed=3)
    mask = np.ones_like(ids)
    mask[0, 2:] = 0  # padding after BOS, EOS
    mask[1, 5:] = 0
    ref = torch_forward(model, ids, mask).last_hidden_state
    out = loaded["sd1"](jnp.asarray(ids), jnp.asarray(mask))
    assert max_rel_diff(out, ref) <= FP32_BOUND
    # the mask matters (so the comparison above is not vacuous)
    assert max_rel_diff(loaded["sd1"](jnp.asarray(ids)), ref) > 1e-3


def test_hidden_states_and_clip_skip(saved, loaded):
    model, _ = saved["sd2"]
    ours = loaded["sd2"]
    ids = pipeline_ids(SD2, seed=4)
    ref = torch_forward(model, ids, output_hidden_states=True)
    states = ours.hidden_states(jnp.asarray(ids))
    assert len(states) == len(ref.hidden_states) == SD2["num_hidden_layers"] + 1
    for got, want in zip(states, ref.hidden_states, strict=True):
        assert max_rel_diff(got, want) <= FP32_BOUND
    # diffusers' clip_skip: final_layer_norm(hidden_states[-(clip_skip + 1)])
    with torch.no_grad():
        skip1 = model.final_layer_norm(ref.hidden_states[-2]).numpy()
    assert max_rel_diff(ours(jnp.asarray(ids), clip_skip=1), skip1) <= FP32_BOUND
    assert max_rel_diff(ours(jnp.asarray(ids), clip_skip=0), ref.last_hidden_state) <= FP32_BOUND
    with pytest.raises(ValueError, match="clip_skip"):
        ours(jnp.asarray(ids), clip_skip=3)


def test_parameter_paths_are_checkpoint_keys(saved, loaded):
    keys = safetensors_numpy.load_file(str(saved["sd1"][1] / "model.safetensors")).keys()
    paths = {".".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(loaded["sd1"], nnx.Param))}
    assert paths == {f"text_model.{k}" for k in keys}  # transformers 5 saves without the prefix


def test_jit_split_merge_and_too_long_input(loaded):
    model = loaded["sd1"]
    ids = jnp.asarray(pipeline_ids(SD1, seed=5))
    graphdef, state = nnx.split(model)
    jitted = jax.jit(lambda st, x: nnx.merge(graphdef, st)(x))
    np.testing.assert_allclose(jitted(state, ids), model(ids), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="max_position_embeddings=16"):
        model(jnp.zeros((1, 17), jnp.int32))


def test_fp16_variant(tmp_path):
    model = make_torch_model(SD1, seed=7).half()
    folder = tmp_path / "text_encoder"
    model.save_pretrained(folder, variant="fp16")
    assert (folder / "model.fp16.safetensors").is_file()
    ours = load_text_encoder(folder, variant="fp16")  # fp16 weights, fp32 parameters and compute
    assert ours.dtype == jnp.float32
    ids = pipeline_ids(SD1, seed=8)
    ref = torch_forward(model.float(), ids).last_hidden_state
    assert max_rel_diff(ours(jnp.asarray(ids)), ref) <= FP32_BOUND
    with pytest.raises(WeightLoadError) as err:
        load_text_encoder(folder)  # no plain model.safetensors
    assert str(folder) in str(err.value) and "model.safetensors" in str(err.value)
    with pytest.raises(WeightLoadError, match=r"model\.bf16\.safetensors"):
        load_text_encoder(folder, variant="bf16")


def test_bf16_load(saved):
    model, folder = saved["sd1"]
    ours = load_text_encoder(folder, dtype="bf16")
    params = jax.tree.leaves(nnx.state(ours, nnx.Param))
    assert all(p.dtype == jnp.bfloat16 for p in params)
    ids = pipeline_ids(SD1, seed=9)
    out = ours(jnp.asarray(ids))
    assert out.dtype == jnp.bfloat16
    assert bool(jnp.isfinite(out.astype(jnp.float32)).all())
    assert max_rel_diff(out.astype(jnp.float32), torch_forward(model, ids).last_hidden_state) <= BF16_BOUND
    assert load_text_encoder(folder, dtype=jnp.float16).dtype == jnp.float16


def test_bf16_checkpoint_loads_exactly(tmp_path):
    model = make_torch_model(SD2, seed=10).to(torch.bfloat16)
    model.save_pretrained(tmp_path)
    ours = load_text_encoder(tmp_path)  # BF16 safetensors -> fp32 parameters
    ids = pipeline_ids(SD2, seed=11)
    ref = torch_forward(model.float(), ids).last_hidden_state
    assert max_rel_diff(ours(jnp.asarray(ids)), ref) <= FP32_BOUND


def test_sharded_checkpoint(saved, tmp_path):
    model, _ = saved["sd2"]
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    shards = sorted(tmp_path.glob("model-*.safetensors"))
    assert len(shards) > 1 and (tmp_path / "model.safetensors.index.json").is_file()
    ids = pipeline_ids(SD2, seed=12)
    assert max_rel_diff(load_text_encoder(tmp_path)(jnp.asarray(ids)),
                        torch_forward(model, ids).last_hidden_state) <= FP32_BOUND
    shards[1].unlink()
    with pytest.raises(WeightLoadError) as err:
        load_text_encoder(tmp_path)
    assert str(shards[1]) in str(err.value) and "model.safetensors.index.json" in str(err.value)


def test_transformers4_layout_with_position_ids(saved, sd1_copy):
    """Checkpoints saved by transformers 4 (every SD release): `text_model.` prefix, a position_ids buffer."""
    def to_v4(t):
        for key in list(t):
            t[f"text_model.{key}"] = t.pop(key)
        t["text_model.embeddings.position_ids"] = np.arange(16, dtype=np.int64)[None]
    rewrite_weights(sd1_copy / "model.safetensors", to_v4)
    model, _ = saved["sd1"]
    ids = pipeline_ids(SD1, seed=13)
    out = load_text_encoder(sd1_copy)(jnp.asarray(ids))
    assert max_rel_diff(out, torch_forward(model, ids).last_hidden_state) <= FP32_BOUND


def test_with_projection_checkpoint(tmp_path):
    model = make_torch_model(SD1, seed=14, cls_name="CLIPTextModelWithProjection")
    model.save_pretrained(tmp_path)
    ids = pipeline_ids(SD1, seed=15)
    out = load_text_encoder(tmp_path)(jnp.asarray(ids))
    assert max_rel_diff(out, torch_forward(model, ids).last_hidden_state) <= FP32_BOUND


# ------------------------------------------------------------------------------------------- config

SD15_CONFIG = {  # runwayml/stable-diffusion-v1-5 text_encoder/config.json
    "_name_or_path": "openai/clip-vit-large-patch14", "architectures": ["CLIPTextModel"],
    "attention_dropout": 0.0, "bos_token_id": 0, "dropout": 0.0, "eos_token_id": 2,
    "hidden_act": "quick_gelu", "hidden_size": 768, "initializer_factor": 1.0, "initializer_range": 0.02,
    "intermediate_size": 3072,
    "layer_norm_eps": 1e-05, "max_position_embeddings": 77, "model_type": "clip_text_model",
    "num_attention_heads": 12, "num_hidden_layers": 12, "pad_token_id": 1, "projection_dim": 768,
    "torch_dtype": "float32", "transformers_version": "4.22.0.dev0", "vocab_size": 49408,
}
SD21_CONFIG = {**SD15_CONFIG, "hidden_act": "gelu", "hidden_size": 1024, "intermediate_size": 4096,
               "num_attention_heads": 16, "num_hidden_layers": 23, "projection_dim": 512}


def test_config_from_real_sd_configs():
    sd15 = CLIPTextConfig.from_transformers(SD15_CONFIG)
    shape = lambda c: (c.hidden_size, c.num_hidden_layers, c.head_dim, c.hidden_act)
    assert shape(sd15) == (768, 12, 64, "quick_gelu")
    assert shape(CLIPTextConfig.from_transformers(SD21_CONFIG)) == (1024, 23, 64, "gelu")
    # every key a transformers 5 CLIPTextConfig writes is understood
    CLIPTextConfig.from_transformers(transformers.CLIPTextConfig(**SD1).to_dict())


@pytest.mark.parametrize("edit, names", [
    ({"hidden_act": "relu"}, ["hidden_act", "'relu'"]),
    ({"hidden_act": "silu"}, ["hidden_act", "'silu'"]),
    ({"architectures": ["CLIPVisionModel"]}, ["architectures", "CLIPVisionModel"]),
    ({"model_type": "clip"}, ["model_type", "'clip'"]),
    ({"rope_theta": 10000.0, "attention_bias": False}, ["attention_bias, rope_theta"]),
    ({"num_attention_heads": 5}, ["hidden_size", "num_attention_heads=5"]),
    ({"pruned_heads": {"0": [1]}}, ["pruned_heads"]),
])
def test_config_errors(edit, names, sd1_copy):
    config = {**SD15_CONFIG, **edit}
    with pytest.raises(ValueError) as err:
        CLIPTextConfig.from_transformers(config)
    for name in names:
        assert name in str(err.value)
    # through the loader: the same message, prefixed with the config file
    path = sd1_copy / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **edit}))
    with pytest.raises(WeightLoadError) as err:
        load_text_encoder(sd1_copy)
    assert str(err.value).startswith(f"{path}: ")
    for name in names:
        assert name in str(err.value)
