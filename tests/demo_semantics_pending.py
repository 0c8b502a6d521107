# ruff: noqa: F811
"""PENDING (issue 18), not collected by pytest: what the shipped demo model (trained 2026-12-02, 1500 VAE +
6000 UNet steps) does not do yet, each with what it measured. Move a test into tests/test_demo_semantics.py
when a retrained model passes it.

- reverse (+red -blue on a red circle): distance to blue plain 248, reverse 248 (already as far as red gets).
- threshold: pixels changed at 0.5 / 0.8 / 0.95: 4072 / 3858 / 4988 (not monotonic on 8x8 latents).
- LEDITS++ on a drawn red square: blue, but drawn as a circle (shape IoU 0.26; layout not kept).
- quality: "a large yellow star on a gray background" 66% of 50 seeds (colour 100%, shape 66%); the other
  seven prompts 94-100%.
"""

from tests.test_demo_semantics import (  # noqa: F401, F811
    BACK,
    BLUE,
    EDIT,
    N_SEEDS,
    STEPS,
    SWAP,
    LEditsPPPipelineStableDiffusion,
    changed_pixels,
    demo,
    demo_figures,
    generate,
    masks,
    np,
    pipe,
    plain,
    shape_distance,
    time,
    to_uint8,
)


def test_reverse_moves_the_colour_away(pipe, plain, masks):
    toward = generate(pipe, **EDIT)
    away = generate(pipe, **BACK)
    base, near, far = (shape_distance(x, masks, BLUE) for x in (plain, toward, away))
    print(f"distance of the shape to blue: plain {base.mean():.0f}, toward {near.mean():.0f}, "
          f"reverse {far.mean():.0f}")
    assert (far > near + 60).all(), (near, far)
    assert far.mean() > base.mean() + 5, (base, far)  # and further than the plain image
    assert all(demo.classify(image)["colour"] != "blue" for image in away)

def test_higher_threshold_changes_fewer_pixels(pipe, plain):
    counts = {t: changed_pixels(generate(pipe, **{**EDIT, "edit_threshold": t}),
                                plain) for t in (0.5, 0.8, 0.95)}
    print("pixels changed by the edit, per threshold:", counts)
    assert counts[0.5] > counts[0.8] > counts[0.95], counts

def test_ledits_changes_a_drawn_shape_colour_and_keeps_the_layout():
    editor = LEditsPPPipelineStableDiffusion.from_pretrained(demo.demo_folder())
    editor.set_progress_bar_config(disable=True)
    scene = demo.Scene("square", "red", "white", "large", "top left")
    image = demo.draw(scene).astype(np.float32)[None] / 255.0
    editor.invert(image, source_prompt=scene.caption(), num_inversion_steps=STEPS, skip=0.1, seed=0)
    # no intersect mask: that needs cross-attention at 1/4 of the latent size, which this 2-level UNet lacks
    out = editor(**SWAP, edit_guidance_scale=8.0, edit_threshold=0.8, output_type="np",
                 use_intersect_mask=False)
    edited = to_uint8(out.images)[0]
    before, after = demo.classify(demo.draw(scene)), demo.classify(edited)
    mask_before, mask_after = demo.shape_mask(demo.draw(scene)), demo.shape_mask(edited)
    iou = (mask_before & mask_after).sum() / (mask_before | mask_after).sum()
    print(f"LEDITS++: {before['colour']} {before['shape']} -> {after['colour']} {after['shape']}, "
          f"shape IoU {iou:.2f}")
    assert after["colour"] == "blue" and after["background"] == "white", after
    assert iou > 0.7, iou

def test_generation_quality_80_percent_of_50_seeds(pipe):
    start = time.perf_counter()
    results = demo_figures.quality(pipe, 50)
    print(f"\n{50} seeds per prompt ({time.perf_counter() - start:.0f} s):")
    for prompt, r in results.items():
        print(f"  {prompt:45s} colour {r['colour']:.0%}  shape {r['shape']:.0%}  both {r['both']:.0%}")
    assert all(r["both"] >= 0.8 for r in results.values()), results

