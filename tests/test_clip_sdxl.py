"""SDXL's text encoders against transformers (PyTorch): `CLIPTextModelWithProjection` (OpenCLIP ViT-bigG,
`text_encoder_2`), the penultimate hidden states and pooled outputs of both encoders (`encode_for_sdxl`),
the loader's class choice, and diffusers' `StableDiffusionXLPipeline.encode_prompt` end to end.
"""

from __future__ import annotations

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sega_jax.models.clip import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    eos_positions,
    load_text_encoder,
)
from sega_jax.models.tokenizer import load_tokenizer, offline_clip_tokenizer
from sega_jax.models.weights import WeightLoadError
from tests.helpers import max_rel_diff
from tests.test_clip import FP32_BOUND, make_torch_model, pipeline_ids, rewrite_weights, torch_forward

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
safetensors_numpy = pytest.importorskip("safetensors.numpy")

# Tiny twins of SDXL's encoders. Config eos_token_id 2 is the legacy value every SD/SDXL config carries
# (pool at argmax(ids)); the ids fed in are BOS 998, EOS 999 and the pad each tokenizer uses.
CLIP_L = dict(vocab_size=1000, hidden_size=32, intermediate_size=37, num_hidden_layers=3,
              num_attention_heads=4, max_position_embeddings=16, hidden_act="quick_gelu", layer_norm_eps=1e-5,
              bos_token_id=0, eos_token_id=2, pad_token_id=1, projection_dim=24)
BIG_G = dict(vocab_size=1000, hidden_size=64, intermediate_size=80, num_hidden_layers=3,
             num_attention_heads=4, max_position_embeddings=16, hidden_act="gelu", layer_norm_eps=1e-5,
             bos_token_id=0, eos_token_id=2, pad_token_id=1, projection_dim=32)
TOKENS_L = dict(bos_token_id=998, eos_token_id=999, pad_token_id=999)  # tokenizer: pads with EOS
TOKENS_G = dict(bos_token_id=998, eos_token_id=999, pad_token_id=0)    # tokenizer_2: pads with "!"
# transformers' newer rule (first id == eos_token_id). EOS 997 is below BOS 998, so argmax(ids) would pick
# BOS: the two rules differ on every row. Padding with EOS checks "first" position.
NEW_EOS = dict(bos_token_id=998, eos_token_id=997, pad_token_id=997)

# name -> (transformers class, config, token ids the "tokenizer" produces)
CASES = {
    "clip_l": ("CLIPTextModel", CLIP_L, TOKENS_L),
    "big_g": ("CLIPTextModelWithProjection", BIG_G, TOKENS_G),
    "clip_l_new_eos": ("CLIPTextModel", {**CLIP_L, **NEW_EOS}, NEW_EOS),
    "big_g_new_eos": ("CLIPTextModelWithProjection", {**BIG_G, **NEW_EOS}, NEW_EOS),
}
OURS = {"CLIPTextModel": CLIPTextModel, "CLIPTextModelWithProjection": CLIPTextModelWithProjection}


def case_ids(name: str, seed: int, seq_len: int | None = None) -> np.ndarray:
    _, cfg, tokens = CASES[name]
    return pipeline_ids({**cfg, **tokens}, seed=seed, seq_len=seq_len)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """name -> (torch model, folder it was saved to with save_pretrained)."""
    out = {}
    for seed, (name, (cls_name, cfg, _)) in enumerate(CASES.items()):
        model = make_torch_model(cfg, 100 + seed, cls_name)
        folder = tmp_path_factory.mktemp(name) / "text_encoder"
        model.save_pretrained(folder)
        out[name] = (model, folder)
    return out


@pytest.fixture(scope="module")
def loaded(saved):
    return {name: load_text_encoder(folder) for name, (_, folder) in saved.items()}


def torch_outputs(model, ids: np.ndarray) -> dict[str, np.ndarray]:
    """transformers' outputs: hidden states, last hidden state, pooler_output, text_embeds (projection)."""
    out = torch_forward(model, ids, output_hidden_states=True)
    base = model.text_model if isinstance(model, transformers.CLIPTextModelWithProjection) else model
    ref = {"hidden_states": [h.numpy() for h in out.hidden_states],
           "last_hidden_state": out.last_hidden_state.numpy(),
           "pooler_output": torch_forward(base, ids).pooler_output.numpy()}
    if hasattr(out, "text_embeds"):
        ref["text_embeds"] = out.text_embeds.numpy()
    return ref


# --------------------------------------------------------------------------------------------- parity


@pytest.mark.parametrize("name", list(CASES))
def test_encode_for_sdxl_parity(name, saved, loaded):
    model, _ = saved[name]
    ours = loaded[name]
    assert type(ours) is OURS[CASES[name][0]]
    ids = case_ids(name, seed=1)
    ref = torch_outputs(model, ids)
    diffs = {"last_hidden_state": max_rel_diff(ours(jnp.asarray(ids)), ref["last_hidden_state"])}
    for clip_skip in (None, 0, 1, 2):
        enc = ours.encode_for_sdxl(jnp.asarray(ids), clip_skip=clip_skip)
        # diffusers: hidden_states[-2] for clip_skip None, else hidden_states[-(clip_skip + 2)]
        want = ref["hidden_states"][-((clip_skip or 0) + 2)]
        diffs[f"prompt_embeds[skip={clip_skip}]"] = max_rel_diff(enc.prompt_embeds, want)
        diffs["pooler_output"] = max_rel_diff(enc.pooler_output, ref["pooler_output"])
        if "text_embeds" in ref:
            assert enc.text_embeds.shape == (len(ids), CASES[name][1]["projection_dim"])
            diffs["text_embeds"] = max_rel_diff(enc.text_embeds, ref["text_embeds"])
        else:
            assert enc.text_embeds is None
    print(name, {k: f"{v:.1e}" for k, v in diffs.items()})
    assert max(diffs.values()) <= FP32_BOUND, diffs
    assert diffs.keys() >= {"pooler_output", "prompt_embeds[skip=1]"}


@pytest.mark.parametrize("name", ["clip_l", "big_g_new_eos"])
def test_pooled_position_follows_the_rule(name, saved, loaded):
    """The pooled row is transformers' EOS token, not the last token or another (so parity is not vacuous)."""
    _, cfg, tokens = CASES[name]
    ids = case_ids(name, seed=2)
    got = np.asarray(eos_positions(jnp.asarray(ids), cfg["eos_token_id"]))
    if cfg["eos_token_id"] == 2:
        want = ids.argmax(-1)
    else:
        want = np.asarray([row.tolist().index(tokens["eos_token_id"]) if tokens["eos_token_id"] in row
                           else 0 for row in ids])
    np.testing.assert_array_equal(got, want)
    assert len(set(want.tolist())) > 2  # rows pool at different positions
    enc = loaded[name].encode_for_sdxl(jnp.asarray(ids))
    last = loaded[name](jnp.asarray(ids))
    np.testing.assert_allclose(enc.pooler_output, last[np.arange(len(ids)), want], rtol=1e-6, atol=1e-6)
    ref = torch_outputs(saved[name][0], ids)["pooler_output"]
    assert max_rel_diff(last[:, -1], ref) > 1e-2 and max_rel_diff(last[:, 0], ref) > 1e-2


def test_short_sequence_mask_and_jit(saved, loaded):
    model, _ = saved["big_g"]
    ours = loaded["big_g"]
    ids = case_ids("big_g", seed=3, seq_len=7)
    mask = np.ones_like(ids)
    mask[:2, 5:] = 0
    with torch.no_grad():
        out = model(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), output_hidden_states=True)
    graphdef, state = nnx.split(ours)
    encode = jax.jit(lambda st, x, m: nnx.merge(graphdef, st).encode_for_sdxl(x, m, clip_skip=1))
    enc = encode(state, jnp.asarray(ids), jnp.asarray(mask))
    assert max_rel_diff(enc.prompt_embeds, out.hidden_states[-3]) <= FP32_BOUND
    assert max_rel_diff(enc.text_embeds, out.text_embeds) <= FP32_BOUND


def test_clip_skip_range(loaded):
    ids = jnp.asarray(case_ids("big_g", seed=4))
    with pytest.raises(ValueError, match=r"clip_skip: expected 0\.\.2, got 3"):
        loaded["big_g"].encode_for_sdxl(ids, clip_skip=3)


def test_parameter_paths_are_checkpoint_keys(saved, loaded):
    keys = safetensors_numpy.load_file(str(saved["big_g"][1] / "model.safetensors")).keys()
    assert "text_projection.weight" in keys
    paths = {".".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(loaded["big_g"], nnx.Param))}
    assert paths == set(keys)
    assert loaded["big_g"].text_projection.weight.shape == (64, 32)  # (hidden, projection_dim)


def test_bf16_projection(saved):
    model, folder = saved["big_g"]
    ours = load_text_encoder(folder, dtype="bf16")
    ids = case_ids("big_g", seed=5)
    enc = ours.encode_for_sdxl(jnp.asarray(ids))
    assert enc.text_embeds.dtype == jnp.bfloat16
    assert max_rel_diff(enc.text_embeds.astype(jnp.float32), torch_outputs(model, ids)["text_embeds"]) <= 3e-2


# ------------------------------------------------------------------------- diffusers' encode_prompt


@pytest.fixture(scope="module")
def sdxl_encoders(tmp_path_factory):
    """Both encoders at the real vocabulary and length, with the real tokenizers (offline BPE)."""
    root = tmp_path_factory.mktemp("sdxl")
    shape = dict(vocab_size=49408, max_position_embeddings=77)
    te1 = make_torch_model({**CLIP_L, **shape}, 200)
    te2 = make_torch_model({**BIG_G, **shape}, 201, "CLIPTextModelWithProjection")
    te1.save_pretrained(root / "text_encoder")
    te2.save_pretrained(root / "text_encoder_2")
    tok1 = load_tokenizer(offline_clip_tokenizer(root / "tokenizer"))
    tok2 = load_tokenizer(offline_clip_tokenizer(root / "tokenizer_2", pad_token="!"))
    return root, (te1, te2), (tok1, tok2)


@pytest.mark.parametrize("clip_skip", [None, 1])
def test_matches_diffusers_encode_prompt(sdxl_encoders, clip_skip):
    diffusers = pytest.importorskip("diffusers")
    root, (te1, te2), (tok1, tok2) = sdxl_encoders
    pipe = diffusers.StableDiffusionXLPipeline(
        vae=None, text_encoder=te1, text_encoder_2=te2, tokenizer=tok1, tokenizer_2=tok2, unet=None,
        scheduler=diffusers.EulerDiscreteScheduler(), add_watermarker=False)
    prompts = ["a photo of the face of a woman", " ".join(["word"] * 90)]  # the second is truncated
    with torch.no_grad():
        embeds, _, pooled, _ = pipe.encode_prompt(prompts, device="cpu", do_classifier_free_guidance=False,
                                                  clip_skip=clip_skip)
    encoders = [load_text_encoder(root / "text_encoder"), load_text_encoder(root / "text_encoder_2")]
    assert [type(e) for e in encoders] == [CLIPTextModel, CLIPTextModelWithProjection]
    outs = []
    for tok, enc in zip((tok1, tok2), encoders, strict=True):
        # the pipeline's tokenizer call
        ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="np").input_ids
        outs.append(enc.encode_for_sdxl(jnp.asarray(ids), clip_skip=clip_skip))
    ours = jnp.concatenate([o.prompt_embeds for o in outs], axis=-1)
    assert ours.shape == (2, 77, 32 + 64)
    diffs = {"prompt_embeds": max_rel_diff(ours, embeds),
             "pooled": max_rel_diff(outs[-1].text_embeds, pooled)}
    print(f"encode_prompt clip_skip={clip_skip}", {k: f"{v:.1e}" for k, v in diffs.items()})
    assert max(diffs.values()) <= FP32_BOUND, diffs


# ----------------------------------------------------------------------------------- loader, config


def test_projection_dim_and_real_sdxl_config():
    sdxl_te2 = {  # stabilityai/stable-diffusion-xl-base-1.0 text_encoder_2/config.json
        "architectures": ["CLIPTextModelWithProjection"], "attention_dropout": 0.0, "bos_token_id": 0,
        "dropout": 0.0, "eos_token_id": 2, "hidden_act": "gelu", "hidden_size": 1280,
        "initializer_factor": 1.0, "initializer_range": 0.02, "intermediate_size": 5120,
        "layer_norm_eps": 1e-05, "max_position_embeddings": 77, "model_type": "clip_text_model",
        "num_attention_heads": 20, "num_hidden_layers": 32, "pad_token_id": 1, "projection_dim": 1280,
        "torch_dtype": "float16", "transformers_version": "4.32.0.dev0", "vocab_size": 49408}
    config = CLIPTextConfig.from_transformers(sdxl_te2)
    shape = (config.hidden_size, config.head_dim, config.projection_dim, config.eos_token_id)
    assert shape == (1280, 64, 1280, 2)
    with pytest.raises(ValueError, match="projection_dim"):
        CLIPTextConfig.from_transformers({**sdxl_te2, "projection_dim": 0})


@pytest.fixture
def big_g_copy(saved, tmp_path):
    folder = tmp_path / "text_encoder_2"
    shutil.copytree(saved["big_g"][1], folder)
    return folder


def test_missing_projection_is_an_error(big_g_copy):
    rewrite_weights(big_g_copy / "model.safetensors", lambda t: t.pop("text_projection.weight"))
    with pytest.raises(WeightLoadError) as err:
        load_text_encoder(big_g_copy)
    msg = str(err.value)
    assert msg.startswith(f"{big_g_copy}: ") and msg.endswith("missing tensor(s) text_projection.weight")
    # as a plain CLIPTextModel the folder loads (the head is not needed)
    assert type(load_text_encoder(big_g_copy, architecture="CLIPTextModel")) is CLIPTextModel


def test_misshaped_or_misnamed_projection(big_g_copy):
    path = big_g_copy / "model.safetensors"
    rewrite_weights(path, lambda t: t.update({"text_projection.weight": np.zeros((24, 64), np.float32)}))
    with pytest.raises(WeightLoadError) as err:
        load_text_encoder(big_g_copy)
    assert "'text_projection.weight' has shape (24, 64), expected (32, 64)" in str(err.value)
    rewrite_weights(path, lambda t: t.update({"text_projection.bias": np.zeros(32, np.float32)}))
    with pytest.raises(WeightLoadError, match=r"unexpected tensor\(s\) text_projection\.bias"):
        load_text_encoder(big_g_copy)


def test_transformers4_keys_and_no_prefix(saved, big_g_copy):
    """Old checkpoints carry a position_ids buffer; keys without `text_model.` load too (as for
    CLIPTextModel)."""
    def edit(t):
        t["text_model.embeddings.position_ids"] = np.arange(16, dtype=np.int64)[None]
        t["final_layer_norm.weight"] = t.pop("text_model.final_layer_norm.weight")
    rewrite_weights(big_g_copy / "model.safetensors", edit)
    ids = case_ids("big_g", seed=6)
    enc = load_text_encoder(big_g_copy).encode_for_sdxl(jnp.asarray(ids))
    assert max_rel_diff(enc.text_embeds, torch_outputs(saved["big_g"][0], ids)["text_embeds"]) <= FP32_BOUND


def test_architecture_choice(saved, big_g_copy):
    # a CLIPTextModel folder ignores a stray projection head, as before
    clip_l = saved["clip_l"][1]
    assert type(load_text_encoder(clip_l)) is CLIPTextModel
    with pytest.raises(WeightLoadError, match="missing tensor.*text_projection.weight"):
        load_text_encoder(clip_l, architecture="CLIPTextModelWithProjection")
    with pytest.raises(ValueError, match="architecture: 'CLIPVisionModel'"):
        load_text_encoder(big_g_copy, architecture="CLIPVisionModel")
    path = big_g_copy / "config.json"
    config = json.loads(path.read_text())
    path.write_text(json.dumps({**config, "architectures": ["CLIPTextModel", "CLIPTextModelWithProjection"]}))
    with pytest.raises(WeightLoadError, match="more than one class") as err:
        load_text_encoder(big_g_copy)
    assert str(err.value).startswith(f"{path}: ")
    path.write_text(json.dumps({k: v for k, v in config.items() if k != "architectures"}))
    assert type(load_text_encoder(big_g_copy)) is CLIPTextModel  # no architectures: CLIPTextModel
