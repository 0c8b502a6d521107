"""CLIP text encoder and tokenizer against transformers (PyTorch), plus the checkpoint loader's errors.

The loader-error tests here cover `sega_jax.models.weights` for the whole project (every model goes through
`load_model`); they assert on what each message names: the file, the tensor key, the shapes.
"""

from __future__ import annotations

import gzip
import json
import logging
import math
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sega_jax.models.clip import CLIPTextConfig, CLIPTextModel, load_text_encoder
from sega_jax.models.tokenizer import (
    clip_bpe_path,
    clip_tokenizer,
    clip_vocab_and_merges,
    load_tokenizer,
    offline_clip_tokenizer,
    tokenize,
)
from sega_jax.models.weights import WeightLoadError
from tests.helpers import max_rel_diff

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


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """name -> (torch model, folder it was saved to with save_pretrained)."""
    out = {}
    for seed, (name, cfg) in enumerate(CONFIGS.items()):
        model = make_torch_model(cfg, seed)
        folder = tmp_path_factory.mktemp(name) / "text_encoder"
        model.save_pretrained(folder)
        out[name] = (model, folder)
    return out


@pytest.fixture(scope="module")
def loaded(saved):
    return {name: load_text_encoder(folder) for name, (_, folder) in saved.items()}


@pytest.fixture
def sd1_copy(saved, tmp_path) -> Path:
    folder = tmp_path / "text_encoder"
    shutil.copytree(saved["sd1"][1], folder)
    return folder


def rewrite_weights(path: Path, edit) -> None:
    tensors = dict(safetensors_numpy.load_file(str(path)))
    edit(tensors)
    safetensors_numpy.save_file(tensors, str(path))


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


# ---------------------------------------------------------------------------------------- tokenizer

PROMPTS = [
    "a photo of a cat",
    "a photo of the face of a woman",
    "smiling, smile",
    "glasses",
    "A Photo of the FACE of a Woman, smiling; glasses!!",
    "it's   a dog's  life  ",
    "",
    "naïve café 123 4567 #hashtag @user",
    "don't you're we've I'm they'll he'd",
    "über-realistic, 8k, trending on artstation, by greg rutkowski",
    "emoji 🙂 test ✨ 日本語のテキスト",
    "tab\tnew\nline",
]


def _bytes_to_unicode() -> dict[int, str]:
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), 256)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


class ReferenceCLIPBPE:
    """OpenAI CLIP's simple_tokenizer.py (the algorithm of SD's tokenizer), minus ftfy/html cleanup."""

    def __init__(self, bpe_path):
        import regex

        merges = gzip.open(bpe_path).read().decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]
        merges = [tuple(m.split()) for m in merges]
        self.byte_encoder = _bytes_to_unicode()
        vocab = list(self.byte_encoder.values())
        vocab = vocab + [v + "</w>" for v in vocab] + ["".join(m) for m in merges]
        vocab += ["<|startoftext|>", "<|endoftext|>"]
        self.encoder = {v: i for i, v in enumerate(vocab)}
        self.ranks = {m: i for i, m in enumerate(merges)}
        self.pat = regex.compile(r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|"""
                                 r"""[\p{N}]|[^\s\p{L}\p{N}]+""", regex.IGNORECASE)

    def bpe(self, token: str) -> list[str]:
        word = [*token[:-1], token[-1] + "</w>"]
        while len(word) > 1:
            pairs = {(a, b) for a, b in zip(word, word[1:], strict=False)}
            best = min(pairs, key=lambda p: self.ranks.get(p, math.inf))
            if best not in self.ranks:
                break
            merged, i = [], 0
            while i < len(word):
                if i < len(word) - 1 and (word[i], word[i + 1]) == best:
                    merged.append(word[i] + word[i + 1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        return word

    def encode(self, text: str) -> list[int]:
        text = " ".join(text.split()).strip().lower()
        ids = [self.encoder["<|startoftext|>"]]
        for token in self.pat.findall(text):
            token = "".join(self.byte_encoder[b] for b in token.encode("utf-8"))
            ids += [self.encoder[t] for t in self.bpe(token)]
        return ids + [self.encoder["<|endoftext|>"]]


@pytest.fixture(scope="module")
def sd_tokenizer():
    return clip_tokenizer()


def test_bpe_file_is_vendored():
    path = clip_bpe_path()
    assert path.parent.name == "assets" and path.parent.parent.name == "sega_jax"
    vocab, merges = clip_vocab_and_merges()
    assert len(vocab) == 49408 and len(merges) == 48894
    assert vocab["<|startoftext|>"] == 49406 and vocab["<|endoftext|>"] == 49407
    assert vocab["!"] == 0 and vocab["a</w>"] == 320 and vocab["photo</w>"] == 1125


def test_offline_tokenizer_folder(tmp_path):
    folder = offline_clip_tokenizer(tmp_path / "tokenizer", pad_token="!")
    assert {p.name for p in folder.iterdir()} == {
        "vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"}
    merges = (folder / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert merges[0] == "#version: 0.2" and len(merges) == 1 + 48894 and merges[1] == "i n"
    assert json.loads((folder / "tokenizer_config.json").read_text())["model_max_length"] == 77
    tok = load_tokenizer(folder)  # SD 2.x style: pad with "!" (id 0)
    ids = tokenize(tok, ["a photo of a cat"])
    assert ids.tolist() == [[49406, 320, 1125, 539, 320, 2368, 49407] + [0] * 70]
    with pytest.raises(ValueError, match="pad_token"):
        offline_clip_tokenizer(tmp_path / "other", pad_token="<pad>")


def test_tokenizer_known_ids(sd_tokenizer):
    # transformers' CLIP documentation example (openai/clip-vit-*: the SD 1.x tokenizer)
    ids = tokenize(sd_tokenizer, ["a photo of a cat", "a photo of a dog"])
    assert ids.dtype == np.int32 and ids.shape == (2, 77)
    assert ids[:, :7].tolist() == [[49406, 320, 1125, 539, 320, 2368, 49407],
                                   [49406, 320, 1125, 539, 320, 1929, 49407]]
    assert (ids[:, 7:] == 49407).all()  # SD 1.x pads with <|endoftext|>


def test_tokenizer_matches_reference_bpe(sd_tokenizer):
    reference = ReferenceCLIPBPE(clip_bpe_path())
    ids = tokenize(sd_tokenizer, PROMPTS)
    for prompt, row in zip(PROMPTS, ids, strict=True):
        want = reference.encode(prompt)
        assert row.tolist() == want + [49407] * (77 - len(want)), prompt


def test_tokenizer_matches_open_clip(sd_tokenizer):
    """open_clip's own SimpleTokenizer, when it can be loaded (needs ftfy, regex, torch; not torchvision)."""
    import importlib.util

    spec = importlib.util.find_spec("open_clip")
    assert spec is not None and importlib.util.find_spec("ftfy") is not None, (
        "the reference tokenizer needs `pip install --no-deps open_clip_torch` and the test extra (ftfy)")
    module_spec = importlib.util.spec_from_file_location(
        "_open_clip_tokenizer", Path(spec.origin).parent / "tokenizer.py")
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    ref = module.SimpleTokenizer()(PROMPTS).numpy()  # pads with 0
    ids = tokenize(sd_tokenizer, PROMPTS)
    for prompt, row, want in zip(PROMPTS, ids, ref, strict=True):
        n = want.tolist().index(49407) + 1
        assert row[:n].tolist() == want[:n].tolist() and (row[n:] == 49407).all(), prompt


def test_tokenize_like_the_pipeline(sd_tokenizer, caplog):
    long_prompt = " ".join(["word"] * 80 + ["tail"])
    texts = ["a photo of a cat", long_prompt]
    with caplog.at_level(logging.WARNING, logger="sega_jax.models.tokenizer"):
        ids = tokenize(sd_tokenizer, texts)
    assert ids.shape == (2, 77)
    # the reference cuts the untruncated ids: BOS + 76 words, no EOS
    full = sd_tokenizer(long_prompt).input_ids
    assert ids[1].tolist() == full[:77] and ids[1, -1] != 49407
    assert "truncated" in caplog.text and "tail" in caplog.text
    # rows within the limit are exactly the reference's tokenizer call
    ref = sd_tokenizer(texts[:1], padding="max_length", max_length=77, return_tensors="np").input_ids
    assert ids[:1].tolist() == ref.tolist()
    # negative-prompt path: transformers' truncation keeps EOS
    neg = tokenize(sd_tokenizer, [long_prompt], truncation=True)
    assert neg.shape == (1, 77) and neg[0, -1] == 49407 and neg[0, :76].tolist() == full[:76]
    assert tokenize(sd_tokenizer, []).shape == (0, 77)
    assert tokenize(sd_tokenizer, "glasses").shape == (1, 77)


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer folder not found") as err:
        load_tokenizer(tmp_path / "nope")
    assert str(tmp_path / "nope") in str(err.value)
    folder = offline_clip_tokenizer(tmp_path / "tokenizer")
    (folder / "merges.txt").unlink()
    with pytest.raises(FileNotFoundError, match=r"missing merges\.txt") as err:
        load_tokenizer(folder)
    assert str(folder) in str(err.value)
