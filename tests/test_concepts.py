"""Learned concepts (sega_jax.loaders.concepts): textual inversion files load as diffusers loads them (the
same text embeddings, the same SEGA image with the token as a concept), `learn` trains only the new row and
what it saves loads in diffusers, the A1111 formats, and errors that name the file or token."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from safetensors.torch import save_file  # noqa: E402

from sega_jax import SemanticStableDiffusionPipeline  # noqa: E402
from sega_jax.loaders import concepts  # noqa: E402
from sega_jax.loaders.concepts import ConceptError  # noqa: E402
from tests.helpers import max_rel_diff  # noqa: E402
from tests.tiny_pipeline import save_reference  # noqa: E402

HIDDEN = 32  # the tiny text encoder's width (sega_jax.testing.reference.TINY_TEXT)
SEGA = dict(editing_prompt=["<cat-toy>", "glasses"], edit_guidance_scale=[6.0, 3.0], edit_warmup_steps=[1, 0],
            edit_threshold=[0.8, 0.9], reverse_editing_direction=[False, True], num_inference_steps=3,
            height=16, width=16, output_type="latent")


def latents(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((1, 4, 8, 8), dtype=np.float32)


def embedding(rows: int, seed: int) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).standard_normal((rows, HIDDEN), dtype=np.float32))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ti-model")
    save_reference(folder)
    return folder


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("ti-files")
    (root / "one").mkdir()
    save_file({"<cat-toy>": embedding(1, 1)}, root / "one" / "learned_embeds.safetensors")
    save_file({"<style>": embedding(3, 2)}, root / "multi.safetensors")
    torch.save({"string_to_param": {"*": embedding(2, 3)}, "name": "a1111", "step": 100}, root / "a1111.pt")
    save_file({"emb_params": embedding(2, 3)}, root / "a1111.safetensors")
    return root


def ours(folder) -> SemanticStableDiffusionPipeline:
    pipe = SemanticStableDiffusionPipeline.from_pretrained(folder, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def diffusers_sd(folder):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def theirs_embeds(pipe, text: str) -> np.ndarray:
    with torch.no_grad():
        return pipe.encode_prompt(text, "cpu", 1, False)[0].numpy()


def test_diffusers_files_give_diffusers_text_embeddings(folder, files):
    mine, ref = ours(folder), diffusers_sd(folder)
    assert mine.load_textual_inversion(files / "one") == ["<cat-toy>"]
    assert mine.load_textual_inversion(files / "multi.safetensors") == ["<style>"]
    ref.load_textual_inversion(files / "one")
    ref.load_textual_inversion(files / "multi.safetensors")
    assert mine.tokenizer.get_added_vocab() == ref.tokenizer.get_added_vocab()
    text = "a <cat-toy> in <style> colours"
    expected = theirs_embeds(ref, text)  # diffusers expands <style> to "<style> <style>_1 <style>_2"
    got = np.asarray(mine.text_embeddings([text]))
    assert max_rel_diff(got, expected) <= 1e-5
    plain = np.asarray(mine.text_embeddings(["a cat-toy in style colours"]))
    assert max_rel_diff(plain, expected) > 1e-2  # the tokens changed the embedding: a real check


def test_sega_with_a_learned_token_as_concept_equals_diffusers_sega(folder, files):
    from diffusers.pipelines.deprecated.semantic_stable_diffusion import (
        SemanticStableDiffusionPipeline as Ref,
    )

    carrier = diffusers_sd(folder)
    carrier.load_textual_inversion(files / "one")
    parts = {k: v for k, v in carrier.components.items() if k != "image_encoder"}
    reference = Ref(**{**parts, "requires_safety_checker": False})
    reference.set_progress_bar_config(disable=True)
    expected = reference(prompt="a photo", latents=torch.from_numpy(latents()), **SEGA).images.numpy()
    mine = ours(folder)
    mine.load_textual_inversion(files / "one")
    got = mine(prompt="a photo", latents=latents(), **SEGA).images
    assert max_rel_diff(got, expected) <= 1e-4
    without = ours(folder)(prompt="a photo", latents=latents(),
                           **dict(SEGA, editing_prompt=["cat-toy", "glasses"])).images
    assert max_rel_diff(without, expected) > 100 * 1e-4


def test_learn_trains_only_the_new_row_and_what_it_saves_loads_in_diffusers(folder, tmp_path):
    pipe = ours(folder)
    table = lambda p: np.asarray(p.text_encoder.text_model.embeddings.token_embedding.weight[...])
    before = table(pipe)
    images = np.random.default_rng(0).integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)
    result = concepts.learn(pipe, images, "<thing>", "cat", steps=40, learning_rate=5e-2, batch_size=2,
                            seed=0)
    after = table(pipe)
    new_id = pipe.tokenizer.convert_tokens_to_ids("<thing>")
    assert new_id == len(before) and after.shape == (len(before) + 1, HIDDEN)
    np.testing.assert_array_equal(after[:-1], before)  # only the new row learned
    cat = before[pipe.tokenizer.convert_tokens_to_ids("cat</w>")]
    assert np.abs(result.embeddings[0] - cat).max() > 1e-2 and np.array_equal(after[-1], result.embeddings[0])
    print(f"denoising loss on fixed draws: {result.loss_before:.4f} -> {result.loss_after:.4f}")
    assert result.loss_after < result.loss_before - 0.01, (result.loss_before, result.loss_after)
    assert len(result.losses) == 40 and np.isfinite(result.losses).all()
    path = concepts.save(tmp_path, {result.token: result.embeddings})
    ref = diffusers_sd(folder)
    ref.load_textual_inversion(path)
    text = "a <thing> on a table"
    assert max_rel_diff(np.asarray(pipe.text_embeddings([text])), theirs_embeds(ref, text)) <= 1e-5
    again = concepts.learn(ours(folder), images, "<thing>", "cat", steps=40, learning_rate=5e-2,
                           batch_size=2, seed=0)
    np.testing.assert_array_equal(again.embeddings, result.embeddings)  # deterministic in seed


def test_a1111_formats_and_the_token_argument(folder, files):
    pipe = ours(folder)
    with pytest.raises(ConceptError, match="allow_pickle=True"):
        pipe.load_textual_inversion(files / "a1111.pt")
    assert pipe.load_textual_inversion(files / "a1111.pt", allow_pickle=True) == ["a1111"]
    assert pipe.load_textual_inversion(files / "a1111.safetensors", token="<same>") == ["<same>"]
    a = np.asarray(pipe.text_embeddings(["a1111 photo"]))
    b = np.asarray(pipe.text_embeddings(["<same> photo"]))
    np.testing.assert_array_equal(a, b)  # the same two vectors under two names
    with pytest.raises(ConceptError, match="names no token"):
        pipe.load_textual_inversion(files / "a1111.safetensors")


def test_bad_files_and_tokens_are_errors_naming_them(folder, files, tmp_path):
    pipe = ours(folder)
    pipe.load_textual_inversion(files / "one")
    with pytest.raises(ConceptError, match="'<cat-toy>' is already in the tokenizer's vocabulary"):
        pipe.load_textual_inversion(files / "one")
    with pytest.raises(ConceptError, match="'cat' is already"):
        pipe.load_textual_inversion(files / "one", token="cat")
    save_file({"<wide>": torch.zeros(1, 768)}, tmp_path / "wide.safetensors")
    with pytest.raises(ConceptError, match="wide.safetensors: .*hidden size 768, the text encoder 32"):
        pipe.load_textual_inversion(tmp_path / "wide.safetensors")
    save_file({"a": torch.zeros(1, 32), "b": torch.zeros(1, 32)}, tmp_path / "two.safetensors")
    with pytest.raises(ConceptError, match="two.safetensors: not a textual inversion embedding"):
        pipe.load_textual_inversion(tmp_path / "two.safetensors")
    with pytest.raises(FileNotFoundError, match="no textual inversion weights"):
        pipe.load_textual_inversion(tmp_path)
    n = len(pipe.tokenizer)
    for second in ("two.safetensors", "wide.safetensors"):  # a list is checked whole before anything is added
        with pytest.raises(ConceptError, match=second):
            pipe.load_textual_inversion([files / "multi.safetensors", tmp_path / second])
        assert len(pipe.tokenizer) == n


def test_sdxl_tokens_in_both_encoders_give_diffusers_sdxl_embeddings(tmp_path):
    """SDXL concepts come with one embedding per encoder (clip_l, clip_g), each loaded with that encoder's
    tokenizer, as diffusers' SDXL pipelines take them; the token's second vector exercises the expansion
    and the pooled output (legacy eos_token_id=2: pooled at the highest id, the new token here)."""
    from diffusers import StableDiffusionXLPipeline

    from sega_jax import SemanticStableDiffusionXLPipeline
    from sega_jax.testing.reference import save_reference_xl

    save_reference_xl(tmp_path)
    ref = StableDiffusionXLPipeline.from_pretrained(tmp_path)
    mine = SemanticStableDiffusionXLPipeline.from_pretrained(tmp_path)
    clip_l, clip_g = {"<tok>": embedding(2, 5)}, {"<tok>": embedding(1, 6)}
    for pipe in (ref, mine):
        pipe.load_textual_inversion(clip_l, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
        pipe.load_textual_inversion(clip_g, text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2)
    text = "a <tok> on a table"
    with torch.no_grad():
        embeds, _, pooled, _ = ref.encode_prompt(text, device="cpu", num_images_per_prompt=1,
                                                 do_classifier_free_guidance=False)
    got = mine.conditioning.encode([text], [text])
    assert max_rel_diff(np.asarray(got["context"]), embeds.numpy()) <= 1e-5
    assert max_rel_diff(np.asarray(got["text_embeds"]), pooled.numpy()) <= 1e-5
    plain = mine.conditioning.encode(["a tok on a table"], ["a tok on a table"])
    assert max_rel_diff(np.asarray(plain["context"]), embeds.numpy()) > 1e-2
