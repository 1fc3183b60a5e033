"""The shapes world: deterministic, captions true to the images, held-out prompts held out."""

import numpy as np
import pytest

from data.shapes import COLOURS, RELATIONS, SHAPES, ShapesWorld, parse_caption
from data.shapes_check import caption_matches, colour_centroids, describe, score_caption


def test_sample_is_a_pure_function_of_seed_and_index(world):
    later_first = [world.sample(i) for i in (7, 3, 7)]
    fresh = ShapesWorld(image_size=32, seed=0)
    for (img_a, cap_a), (img_b, cap_b) in zip(later_first, [fresh.sample(i) for i in (7, 3, 7)]):
        assert cap_a == cap_b and np.array_equal(img_a, img_b)
    img, cap = world.sample(0)
    assert img.shape == (32, 32, 3) and img.dtype == np.uint8
    other_seed = [ShapesWorld(seed=1).sample(i)[1] for i in range(20)]
    assert other_seed != [world.sample(i)[1] for i in range(20)]
    assert len({world.sample(i)[1] for i in range(20)}) > 10  # indices differ too


@pytest.mark.parametrize("size", [32, 64])
def test_captions_match_images(size):
    world = ShapesWorld(image_size=size, seed=3)
    n_two = 0
    for i in range(300 if size == 32 else 60):
        image, caption = world.sample(i)
        scene = parse_caption(caption)
        seen = describe(image)
        # exactly the captioned colours, with the captioned shapes
        assert sorted(c for c, *_ in seen) == sorted(c for c, _ in scene.objects), (i, caption, seen)
        assert score_caption(image, caption) == {"colours": True, "shapes": True, "relation": True}, (i, caption, seen)
        if scene.relation is not None:
            n_two += 1
            centroids = colour_centroids(image)
            (r1, c1, _), (r2, c2, _) = centroids[scene.objects[0][0]], centroids[scene.objects[1][0]]
            holds = {"above": r1 < r2 - 3, "below": r1 > r2 + 3, "left of": c1 < c2 - 3, "right of": c1 > c2 + 3}
            assert holds[scene.relation], (i, caption, centroids)
    assert n_two > 0


@pytest.mark.parametrize("relation", list(RELATIONS))
def test_render_follows_every_relation(world, relation):
    rng = np.random.default_rng(0)
    words = " ".join(RELATIONS[relation])
    for _ in range(10):
        caption = f"a green triangle {words} an orange square"
        assert caption_matches(world.render(caption, rng), caption)
        # the checker is not vacuous: the swapped relation must fail on the same image
        swapped = {"above": "below", "below": "above", "left of": "right of", "right of": "left of"}[relation]
        image = world.render(caption, rng)
        assert not caption_matches(image, f"a green triangle {' '.join(RELATIONS[swapped])} an orange square")
        assert not caption_matches(image, f"a green circle {words} an orange square")


def test_every_colour_and_shape_renders_recognisably(world):
    rng = np.random.default_rng(1)
    for colour in COLOURS:
        for shape in SHAPES:
            caption = f"{'an' if colour == 'orange' else 'a'} {colour} {shape}"
            (found_colour, found_shape, _, fraction), = describe(world.render(caption, rng))
            assert (found_colour, found_shape) == (colour, shape) and fraction > 0.05, caption


def test_held_out_prompts_never_in_training_stream(world):
    held_out = world.held_out_prompts()
    assert len(held_out) == 8 and len(set(held_out)) == 8
    assert {parse_caption(p).relation for p in held_out} == set(RELATIONS)
    training = set(world.training_captions())
    assert not training & set(held_out)
    assert set(world.train_prompts_example()) <= training
    seen = {world.sample(i)[1] for i in range(2000)}
    assert not seen & set(held_out)
    assert seen <= training
    assert len(seen) > 500  # the stream covers the caption space, it does not collapse
    # held-out prompts still render correctly (the demo scores samples for them)
    rng = np.random.default_rng(0)
    for prompt in held_out:
        assert caption_matches(world.render(prompt, rng), prompt)


def test_vocabulary_covers_all_captions(world):
    vocab = set(world.vocabulary())
    assert {w for c in world.all_captions() for w in c.split()} == vocab
    assert set(COLOURS) | set(SHAPES) | {"above", "below", "left", "right"} <= vocab


@pytest.mark.parametrize("bad", ["", "a red hexagon", "a orange circle", "a red circle near a blue square",
                                 "a red circle above a red square"])
def test_unparseable_captions_raise(world, bad):
    with pytest.raises(ValueError):
        world.render(bad, np.random.default_rng(0))
