"""Safety checker and CLIP image preprocessing against diffusers' `StableDiffusionSafetyChecker` and
transformers' `CLIPImageProcessor` (PIL backend), on tiny random weights saved with `save_pretrained`.

The thresholds are chosen from the reference's own cosine similarities so that, in a batch of 6 images,
some are flagged by a concept, one only because a special-care concept raised its adjustment, and the
rest are not; every score is kept well away from the rounding decision so fp32 noise cannot flip a flag.
"""

from __future__ import annotations

import json
import logging
import math

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from sega_jax.models import safety_checker as sc
from sega_jax.models.image_processing import CLIPImageProcessor, load_feature_extractor
from sega_jax.models.weights import WeightLoadError
from tests.helpers import max_rel_diff

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
ref_sc = pytest.importorskip("diffusers.pipelines.stable_diffusion.safety_checker")
from diffusers.image_processor import VaeImageProcessor  # noqa: E402

# transformers 5 names the PIL backend CLIPImageProcessorPil (CLIPImageProcessor falls back to it without
# torchvision); transformers 4's CLIPImageProcessor is the PIL implementation.
RefProcessor = getattr(transformers, "CLIPImageProcessorPil", transformers.CLIPImageProcessor)

VISION = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, image_size=32,
              patch_size=8, hidden_act="quick_gelu", layer_norm_eps=1e-5)
TEXT = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
BATCH, HEIGHT, WIDTH = 6, 40, 48
MARGIN = 2e-4        # minimum distance of every score from the reference's decision point (0.0005)


def _random_checker():
    torch.manual_seed(0)
    config = transformers.CLIPConfig(text_config=TEXT, vision_config=VISION, projection_dim=16)
    model = ref_sc.StableDiffusionSafetyChecker(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
            elif p.ndim == 1:
                p.copy_(torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) / math.sqrt(p[0].numel()))
    return model


def _decoded_images() -> torch.Tensor:
    """VAE-output-like NCHW images in [-1, 1] (smooth per-image colour fields plus noise)."""
    g = torch.Generator().manual_seed(1)
    low = torch.randn(BATCH, 3, 5, 6, generator=g)
    smooth = torch.nn.functional.interpolate(low, size=(HEIGHT, WIDTH), mode="bilinear")
    return torch.tanh(smooth + 0.3 * torch.randn(BATCH, 3, HEIGHT, WIDTH, generator=g))


def _choose_thresholds(cos: np.ndarray, special: np.ndarray):
    """Concept 0 flags 2 images; special-care concept j (moved to index 0) fires for another image i, whose
    concept c then crosses its threshold only thanks to the +0.01 adjustment; special concept 1 of image i
    reports a positive score only through the adjustment (the reference's in-loop quirk).

    Returns (concept thresholds, special thresholds, i, permutation of the special-care rows)."""
    thr = cos.max(0) + 0.05
    order = np.argsort(cos[:, 0])[::-1]
    thr[0] = (cos[order[1], 0] + cos[order[2], 0]) / 2
    for i in order[2:]:
        for j in range(special.shape[1]):
            if special[i, j] - np.delete(special[:, j], i).max() < 0.01:
                continue
            for c in range(1, cos.shape[1]):
                if cos[i, c] - np.delete(cos[:, c], i).max() > 0.01:
                    perm = [j] + [k for k in range(special.shape[1]) if k != j]
                    special = special[:, perm]
                    sthr = special.max(0) + 0.05
                    sthr[0] = special[i, 0] - 0.004
                    sthr[1] = special[i, 1] + 0.004
                    thr[c] = cos[i, c] + 0.004
                    return thr.astype(np.float32), sthr.astype(np.float32), int(i), perm
    raise AssertionError("test setup: no image/concept pair fits; change the seeds")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("safety")
    model = _random_checker()
    processor = RefProcessor(size={"shortest_edge": 32}, crop_size=32)
    decoded = _decoded_images()
    pil = VaeImageProcessor().postprocess(decoded, output_type="pil")
    clip_input = processor(pil, return_tensors="pt").pixel_values
    with torch.no_grad():
        embeds = model.visual_projection(model.vision_model(clip_input)[1])
        cos = ref_sc.cosine_distance(embeds, model.concept_embeds).numpy()
        special = ref_sc.cosine_distance(embeds, model.special_care_embeds).numpy()
    thr, sthr, special_image, perm = _choose_thresholds(cos, special)
    special = special[:, perm]
    with torch.no_grad():
        model.special_care_embeds.copy_(model.special_care_embeds[perm].clone())
        model.concept_embeds_weights.copy_(torch.from_numpy(thr))
        model.special_care_embeds_weights.copy_(torch.from_numpy(sthr))
    model.save_pretrained(root / "safety_checker")
    processor.save_pretrained(root / "feature_extractor")
    return dict(root=root, model=model, processor=processor, decoded=decoded, pil=pil,
                clip_input=clip_input, cos=cos, special=special, special_image=special_image)


def _reference_forward(model, clip_input, images, monkeypatch):
    """diffusers' forward, recording the per-image scores it rounds (they are not returned)."""
    recorded = []

    def recording_round(value, ndigits=None):
        out = round(value, ndigits)
        recorded.append(out)
        return out

    monkeypatch.setattr(ref_sc, "round", recording_round, raising=False)
    images, flags = model(clip_input=clip_input, images=images)
    monkeypatch.undo()
    scores = np.asarray(recorded, np.float32).reshape(len(flags), -1)
    return images, flags, scores[:, :sc.NUM_SPECIAL_CARE], scores[:, sc.NUM_SPECIAL_CARE:]


def _assert_scores_equal(ours, ref, raw):
    """Rounded scores equal, except where the unrounded value sits within fp32 noise of a rounding tie."""
    ours, ref = np.asarray(ours), np.asarray(ref)
    near_tie = np.abs(np.abs(raw * 1000 - np.floor(raw * 1000)) - 0.5) < 1e-3
    ok = (np.abs(ours - ref) <= 1e-7) | (near_tie & (np.abs(ours - ref) <= 1.001e-3))
    assert ok.all(), f"scores differ at {np.argwhere(~ok).tolist()}: {ours[~ok]} vs {ref[~ok]}"


def test_flags_and_scores_match_reference(setup, monkeypatch):
    model, cos, special = setup["model"], setup["cos"], setup["special"]
    _, ref_flags, ref_special, ref_scores = _reference_forward(
        model, setup["clip_input"], setup["decoded"].clone(), monkeypatch)

    # Test setup: mixed flags, one image flagged only through the special-care adjustment, no borderline.
    thr = model.concept_embeds_weights.numpy()
    sthr = model.special_care_embeds_weights.numpy()
    assert 0 < sum(ref_flags) < BATCH, ref_flags
    i = setup["special_image"]
    assert ref_flags[i] and not (cos[i] - thr > 0.0005).any()
    assert (ref_special[i] > 0).sum() == 2       # the second only through the in-loop adjustment
    adj = np.where((ref_special > 0).any(1), 0.01, 0.0)[:, None]
    assert np.abs(cos - thr + adj - 0.0005).min() > MARGIN
    assert np.abs(special - sthr - 0.0005).min() > MARGIN

    checker = sc.load_safety_checker(setup["root"] / "safety_checker")
    out = sc.check_images(checker, np.transpose(setup["clip_input"].numpy(), (0, 2, 3, 1)))
    assert np.asarray(out.has_nsfw_concepts).tolist() == ref_flags
    assert max_rel_diff(out.cos_dist, cos) < 1e-4
    assert max_rel_diff(out.special_cos_dist, special) < 1e-4
    with torch.no_grad():
        ref_embeds = model.visual_projection(model.vision_model(setup["clip_input"])[1]).numpy()
    assert max_rel_diff(out.image_embeds, ref_embeds) < 1e-4
    _assert_scores_equal(out.concept_scores, ref_scores, cos - thr + adj)
    _assert_scores_equal(out.special_scores, ref_special, special - sthr)


def test_run_safety_checker_blacks_out_like_reference_pipeline(setup, monkeypatch, caplog):
    """The pipeline's path: decoded [-1, 1] images -> PIL -> feature extractor -> checker -> postprocess."""
    model, decoded = setup["model"], setup["decoded"]
    vae_processor = VaeImageProcessor()
    images, ref_flags, _, _ = _reference_forward(model, setup["clip_input"], decoded.clone(), monkeypatch)
    ref_out = vae_processor.postprocess(images, output_type="np", do_denormalize=[not f for f in ref_flags])

    checker = sc.load_safety_checker(setup["root"] / "safety_checker")
    fe = load_feature_extractor(setup["root"] / "feature_extractor")
    ours_in = np.clip(np.transpose(decoded.numpy(), (0, 2, 3, 1)) / 2 + 0.5, 0.0, 1.0)
    with caplog.at_level(logging.WARNING, logger=sc.__name__):
        out, flags = sc.run_safety_checker(checker, fe, ours_in)
    assert flags == ref_flags and isinstance(flags[0], bool)
    assert out.dtype == np.float32 and out.shape == ref_out.shape
    np.testing.assert_array_equal(out, ref_out)
    flagged = np.asarray(flags)
    assert (out[flagged] == 0).all() and (out[~flagged] == ours_in[~flagged]).all()
    assert "Potential NSFW content" in caplog.text


@pytest.mark.parametrize("shape", [(37, 53), (64, 48), (32, 32)])
def test_preprocess_matches_clip_image_processor(setup, shape):
    rng = np.random.default_rng(shape[0])
    uint8 = rng.integers(0, 256, (2, *shape, 3), dtype=np.uint8)
    ref = setup["processor"]([Image.fromarray(x) for x in uint8], return_tensors="np").pixel_values
    fe = load_feature_extractor(setup["root"] / "feature_extractor")
    ours = fe.preprocess(uint8)
    assert ours.dtype == np.float32 and ours.shape == (2, 32, 32, 3)
    assert np.abs(ours - np.transpose(ref, (0, 2, 3, 1))).max() <= 1e-5
    # float input in [0, 1] goes through diffusers' numpy_to_pil rounding first
    floats = rng.random((2, *shape, 3), dtype=np.float32)
    ref_f = setup["processor"](VaeImageProcessor.numpy_to_pil(floats), return_tensors="np").pixel_values
    assert np.abs(fe.preprocess(floats) - np.transpose(ref_f, (0, 2, 3, 1))).max() <= 1e-5


def test_preprocess_legacy_config_and_padding(tmp_path):
    """SD 1.x-style config (int size/crop_size, no rescale keys) and a crop larger than the resized image."""
    configs = {
        "legacy": {"crop_size": 24, "do_center_crop": True, "do_convert_rgb": True, "do_normalize": True,
                   "do_resize": True, "feature_extractor_type": "CLIPFeatureExtractor",
                   "image_mean": [0.48145466, 0.4578275, 0.40821073],
                   "image_std": [0.26862954, 0.26130258, 0.27577711], "resample": 3, "size": 27},
        "padded": {"size": {"shortest_edge": 20}, "crop_size": {"height": 30, "width": 26}, "resample": 2,
                   "image_mean": 0.5, "image_std": 0.25},
        "edges": {"size": {"shortest_edge": 24, "longest_edge": 30}, "crop_size": 22},
    }
    uint8 = np.random.default_rng(0).integers(0, 256, (1, 37, 53, 3), dtype=np.uint8)
    for name, config in configs.items():
        folder = tmp_path / name
        folder.mkdir()
        (folder / "preprocessor_config.json").write_text(json.dumps(config))
        ref = RefProcessor.from_pretrained(folder)([Image.fromarray(uint8[0])], return_tensors="np")
        ref = ref.pixel_values
        ours = load_feature_extractor(folder).preprocess(uint8)
        assert ours.shape == np.transpose(ref, (0, 2, 3, 1)).shape, name
        assert np.abs(ours - np.transpose(ref, (0, 2, 3, 1))).max() <= 1e-5, name


def test_legacy_checkpoint_keys_and_compile_once(setup, tmp_path):
    """SD 1.x checkpoints spell the tower `vision_model.vision_model.*` and may carry `position_ids`."""
    from safetensors.numpy import load_file, save_file

    src = setup["root"] / "safety_checker"
    tensors = load_file(src / "model.safetensors")
    legacy = {("vision_model." + k if k.startswith("vision_model.") else k): v for k, v in tensors.items()}
    legacy["vision_model.vision_model.embeddings.position_ids"] = np.arange(17, dtype=np.int64)[None]
    folder = tmp_path / "safety_checker"
    folder.mkdir()
    save_file(legacy, folder / "model.safetensors")
    config = json.loads((src / "config.json").read_text())
    config["vision_config_dict"] = {k: VISION[k] for k in ("hidden_size", "intermediate_size",
                                                            "num_attention_heads", "num_hidden_layers",
                                                            "patch_size", "image_size")}
    config["vision_config"] = {"hidden_size": 999}       # replaced by vision_config_dict, as in transformers
    (folder / "config.json").write_text(json.dumps(config))

    clip_input = np.transpose(setup["clip_input"].numpy(), (0, 2, 3, 1))
    a = sc.check_images(sc.load_safety_checker(src), clip_input)
    checker = sc.load_safety_checker(folder)
    before = sc.TRACE_COUNT["safety_checker"]
    b = sc.check_images(checker, clip_input)
    # The legacy spelling loads into the same module graph as `a`'s checker: its program is reused.
    assert sc.TRACE_COUNT["safety_checker"] == before
    sc.check_images(checker, clip_input + 0.5)
    assert sc.TRACE_COUNT["safety_checker"] == before               # same shapes: no retrace
    np.testing.assert_array_equal(np.asarray(a.cos_dist), np.asarray(b.cos_dist))
    odd = np.concatenate([clip_input, clip_input[:1]])              # a batch of 7: used by no other test
    sc.check_images(checker, odd)
    assert sc.TRACE_COUNT["safety_checker"] == before + 1           # a new batch shape: exactly one trace
    sc.check_images(checker, odd[::-1])
    assert sc.TRACE_COUNT["safety_checker"] == before + 1


def test_bf16_load_runs(setup):
    checker = sc.load_safety_checker(setup["root"] / "safety_checker", dtype="bf16")
    assert checker.dtype == jnp.bfloat16 and checker.concept_embeds_weights.dtype == jnp.bfloat16
    out = sc.check_images(checker, np.transpose(setup["clip_input"].numpy(), (0, 2, 3, 1)))
    assert out.cos_dist.dtype == jnp.float32 and out.has_nsfw_concepts.dtype == jnp.bool_
    assert np.isfinite(np.asarray(out.cos_dist)).all()
    assert max_rel_diff(out.cos_dist, setup["cos"]) < 5e-2


def test_errors_name_the_path(setup, tmp_path):
    with pytest.raises(WeightLoadError, match="missing_sc"):
        sc.load_safety_checker(tmp_path / "missing_sc")
    with pytest.raises(WeightLoadError, match="missing_fe"):
        load_feature_extractor(tmp_path / "missing_fe")
    (tmp_path / "empty").mkdir()
    with pytest.raises(WeightLoadError, match="preprocessor_config.json"):
        load_feature_extractor(tmp_path / "empty")
    with pytest.raises(WeightLoadError, match="config.json"):
        sc.load_safety_checker(tmp_path / "empty")
    checker = sc.load_safety_checker(setup["root"] / "safety_checker")
    with pytest.raises(ValueError, match="NHWC"):
        sc.check_images(checker, np.zeros((1, 3, 32, 32), np.float32))
    with pytest.raises(ValueError, match="do_pad"):
        CLIPImageProcessor.from_dict({"do_pad": True})
