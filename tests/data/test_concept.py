"""The fine-tuning target: pink, in the palette and the vocabulary, never in the pretraining stream."""

import hashlib
import itertools

import numpy as np
import pytest

from data.shapes import (BACKGROUNDS, COLOURS, CONCEPT, ConceptWorld, ShapesWorld, concept_prompts,
                         concept_reference_prompts, is_held_out, parse_caption)
from data.shapes_check import caption_matches, describe, score_caption
from data.shard_inputs import list_chunks, list_inputs, load_item

# The pretraining stream (one-shape share 0.4), pinned: pink and the concept stream must
# not move it by one pixel.
PRETRAIN_PINS = {
    (0, 32, 0): ("a green circle above a blue circle", "5950b1de38a213de"),
    (0, 32, 1): ("a yellow triangle to the right of a purple circle", "7a56d9d338a9d54a"),
    (0, 32, 123): ("a purple triangle", "520e54714a03c35d"),
    (0, 32, 9599): ("a blue square to the right of a green square", "3ce8638171831df1"),
    (3, 64, 1): ("a yellow square", "ee837ccbf27e63cc"),
    (3, 64, 7): ("an orange triangle above a blue circle", "a914438c0ed01636"),
}
FIRST_300_SHA = "231ceb0308256e48"  # captions + pixels of samples 0..299, seed 0, 32 px
TRAINING_CAPTIONS_SHA = "0c5c521ad8515bc4"  # the 866 pretraining captions, in order
PROMPTS_SHA = "bdf7bed65a200955"  # held_out_prompts() + train_prompts_example()

CONCEPT_PROMPTS = [
    "a pink circle above a green square",
    "a blue triangle below a pink circle",
    "a pink circle to the left of a yellow triangle",
    "a red square to the right of a pink circle",
    "a pink circle below an orange square",
    "a purple circle above a pink circle",
    "a pink circle to the right of a blue square",
    "a green triangle to the left of a pink circle",
]
REFERENCE_PROMPTS = [
    "a red circle above a green square",
    "a blue triangle below a yellow circle",
    "a purple circle to the left of a yellow triangle",
    "a red square to the right of a green circle",
    "a blue circle below an orange square",
    "a purple circle above a red circle",
    "a yellow circle to the right of a blue square",
    "a green triangle to the left of a red circle",
]


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def test_pretraining_stream_is_unchanged_by_the_concept():
    for (seed, size, index), (caption, digest) in PRETRAIN_PINS.items():
        image, got = ShapesWorld(image_size=size, seed=seed).sample(index)
        assert (got, _sha(image.tobytes())) == (caption, digest), (seed, size, index)
    world, h = ShapesWorld(), hashlib.sha256()
    for i in range(300):
        image, caption = world.sample(i)
        h.update(caption.encode())
        h.update(image.tobytes())
    assert h.hexdigest()[:16] == FIRST_300_SHA
    assert len(world.training_captions()) == 866
    assert _sha("\n".join(world.training_captions()).encode()) == TRAINING_CAPTIONS_SHA
    assert _sha("\n".join(world.held_out_prompts() + world.train_prompts_example()).encode()) == PROMPTS_SHA


def test_pink_is_in_the_palette_and_vocabulary_but_never_pretrained(world):
    assert CONCEPT == "pink" and "pink" in COLOURS and "pink" in world.vocabulary()
    palette = list(COLOURS.values()) + list(BACKGROUNDS.values())
    for a, b in itertools.combinations(palette, 2):
        assert np.linalg.norm(np.subtract(a, b)) > 90, (a, b)
    # No antialiased edge of a colour on a background comes within 64 (the checker's
    # max_distance) of a third palette entry, so no edge is read as another colour
    # (hot pink, (255, 105, 180), fails this: a red edge on light grey passes 63 from it).
    cover = np.linspace(0, 1, 201)[:, None]
    for name, rgb in COLOURS.items():
        for bg_name, bg in BACKGROUNDS.items():
            blend = cover * np.array(rgb) + (1 - cover) * np.array(bg)
            for other in [v for k, v in {**COLOURS, **BACKGROUNDS}.items() if k not in (name, bg_name)]:
                assert np.linalg.norm(blend - np.array(other), axis=1).min() > 64, (name, bg_name, other)
    assert not any("pink" in c for c in world.training_captions())
    assert not any("pink" in p for p in world.held_out_prompts() + world.train_prompts_example())
    assert not any("pink" in world.sample(i)[1] for i in range(3000))
    assert any("pink" in c for c in world.all_captions())  # the tiny encoder's tokenizer is trained on it


def test_pink_renders_and_is_recognised(world):
    rng = np.random.default_rng(2)
    for shape in ("circle", "square", "triangle"):
        caption = f"a pink {shape}"
        (colour, found, _, fraction), = describe(world.render(caption, rng))
        assert (colour, found) == ("pink", shape) and fraction > 0.05
    image = world.render("a pink square above a red circle", rng)
    assert caption_matches(image, "a pink square above a red circle")
    assert not caption_matches(image, "a purple square above a red circle")  # pink is not read as purple
    assert not caption_matches(image, "a pink square below a red circle")


@pytest.mark.parametrize("split", ["train", "val"])
def test_concept_stream_always_shows_pink_and_matches_its_captions(split):
    world = ConceptWorld(image_size=32, seed=0, split=split)
    captions = []
    for i in range(400):
        image, caption = world.sample(i)
        assert "pink" in caption.split(), caption
        assert score_caption(image, caption) == {"colours": True, "shapes": True, "relation": True}, (i, caption)
        captions.append(caption)
    assert set(captions) <= set(world.training_captions())
    singles = sum(parse_caption(c).relation is None for c in captions)
    assert 60 < singles < 140  # about a quarter
    scenes = [parse_caption(c) for c in captions if parse_caption(c).relation]
    assert {s.relation for s in scenes} == {"above", "below", "left of", "right of"}
    assert {s.objects[0][0] == "pink" for s in scenes} == {True, False}  # pink first and second
    # a pure function of (seed, split, index)
    again = ConceptWorld(image_size=32, seed=0, split=split)
    for i in (5, 0, 5):
        (a, ca), (b, cb) = world.sample(i), again.sample(i)
        assert ca == cb and np.array_equal(a, b)
    assert [ConceptWorld(seed=1, split=split).sample(i)[1] for i in range(20)] != captions[:20]


def test_concept_splits_are_disjoint_and_hold_out_the_eval_prompts():
    train, val = ConceptWorld(split="train"), ConceptWorld(split="val")
    n = 2000
    train_samples = [train.sample(i) for i in range(n)]
    val_samples = [val.sample(i) for i in range(300)]
    train_hashes = {_sha(img.tobytes()) for img, _ in train_samples}
    assert not train_hashes & {_sha(img.tobytes()) for img, _ in val_samples}  # no validation image is trained on
    assert [c for _, c in train_samples[:50]] != [c for _, c in val_samples[:50]]
    seen = {c for _, c in train_samples} | {c for _, c in val_samples}
    assert not seen & set(concept_prompts())
    assert not set(train.training_captions()) & set(concept_prompts())
    assert len(seen) > 200  # 259 captions: the stream covers them
    assert not any(is_held_out(parse_caption(c)) for c in seen)  # nor the base world's held-out pairs
    assert train.held_out_prompts() == concept_prompts()
    assert set(train.train_prompts_example()) <= set(train.training_captions())
    with pytest.raises(ValueError, match="split"):
        ConceptWorld(split="test")


def test_concept_prompt_sets_are_pinned():
    assert concept_prompts() == CONCEPT_PROMPTS
    assert concept_reference_prompts() == REFERENCE_PROMPTS
    pretrain = set(ShapesWorld().training_captions())
    rng = np.random.default_rng(0)
    for pink, ref in zip(CONCEPT_PROMPTS, REFERENCE_PROMPTS):
        p, r = parse_caption(pink), parse_caption(ref)
        assert p.relation == r.relation and [s for _, s in p.objects] == [s for _, s in r.objects]
        (swapped,) = {rc for (pc, _), (rc, _) in zip(p.objects, r.objects) if pc == "pink"}
        assert swapped not in {c for c, _ in p.objects}  # a colour not already in the prompt
        assert ref in pretrain  # the base has been trained on exactly this caption
        for prompt in (pink, ref):
            assert caption_matches(ShapesWorld().render(prompt, rng), prompt)
    assert {parse_caption(p).relation for p in CONCEPT_PROMPTS} == {"above", "below", "left of", "right of"}


def test_shard_inputs_name_the_concept_streams():
    base = list_inputs("shapes:3:32:0")
    assert [it.image for it in base] == [("shapes", 32, 0, i) for i in range(3)]  # unchanged references
    pink, pink_val = list_inputs("shapes-pink:3"), list_inputs("shapes-pink-val:3:32:5")
    assert [it.key for it in pink] == [f"shapes-pink-0-32/{i:08d}" for i in range(3)]
    assert pink_val[2].image == ("shapes", 32, 5, 2, "shapes-pink-val")
    for items, world in ((base, ShapesWorld()), (pink, ConceptWorld()), (pink_val, ConceptWorld(seed=5, split="val"))):
        for i, item in enumerate(items):
            image, caption, meta = load_item(item, None)
            expect_image, expect_caption = world.sample(i)
            assert caption == expect_caption and np.array_equal(np.asarray(image), expect_image)
    # chunks travel through job rows as JSON
    chunk = list_chunks("shapes-pink-val:5:32:5", 2)[1]
    assert type(chunk).from_json(chunk.to_json()) == chunk and chunk.items[0].image[-1] == "shapes-pink-val"
    for bad in ("shapes-pink:x", "shapes-pink:4:16", "shapes-teal:4", "shapes-pink:1:32:0:9"):
        with pytest.raises(ValueError, match="input"):
            list_inputs(bad)


def _pipeline(tmp_path, spec: str, out, *extra: str) -> str:
    """`python -m krablet.pipeline` as scripts/demo.sh runs it (embedded PostgreSQL in tmp_path)."""
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    cmd = [sys.executable, "-m", "krablet.pipeline", "--input", spec, "--output", str(out), "--chunk-size", "8",
           "--resolution", "32", "--bucket-multiple", "16", "--pixel-downsample", "2", "--text-len", "24",
           "--workers", "1", "--run-dir", str(tmp_path / "krablet"), *extra]
    env = dict(os.environ, PYTHONPATH=root, OMP_NUM_THREADS="1")
    env.pop("KRABLET_DSNS", None)
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc.stdout


def test_pipeline_writes_pink_shards_with_the_base_runs_encoder(tmp_path):
    """The SFT data: Krablet jobs on real PostgreSQL write shapes-pink shards encoded with
    the base shard set's text encoder (--encoder), beside the base set in the same database."""
    import torch

    from data.shard_loader import ShardIndex, ShardReader
    from data.text import TextEncoder

    base, pink, val = tmp_path / "base" / "shards", tmp_path / "pink", tmp_path / "pink_val"
    _pipeline(tmp_path, "shapes:16:32", base)
    encoder_dir = base / "text_encoder"
    out = _pipeline(tmp_path, "shapes-pink:16:32", pink, "--encoder", str(encoder_dir))
    assert "jobs done 3/3" in out  # this ingestion's jobs, not the base set's done ones as well
    _pipeline(tmp_path, "shapes-pink-val:8:32", val, "--encoder", str(encoder_dir))
    assert not (pink / "text_encoder").exists()  # no encoder of its own was built

    def samples(folder):
        index = ShardIndex(str(folder))
        reader = ShardReader(index, text_len=index.meta["max_text"])
        return index, [reader.sample(i) for i in range(index.total)]

    (base_index, base_samples), (pink_index, pink_samples), (_, val_samples) = map(samples, (base, pink, val))
    assert pink_index.total == 16 and len(val_samples) == 8
    assert pink_index.meta["text"] == base_index.meta["text"]  # same layers, dim, length, model
    pink_captions = sorted(r["caption"] for r, _ in pink_samples)
    assert pink_captions == sorted(ConceptWorld().sample(i)[1] for i in range(16))
    assert all("pink" in c.split() for c in pink_captions)
    assert not any("pink" in r["caption"] for r, _ in base_samples)
    assert sorted(r["caption"] for r, _ in val_samples) == sorted(ConceptWorld(split="val").sample(i)[1]
                                                                   for i in range(8))
    # The caption both sets hold, the empty one (caption dropout), has bitwise the same features,
    # and every pink caption's features are the base encoder's (stored as float16).
    assert np.array_equal(np.load(base / "empty_text.npy"), np.load(pink / "empty_text.npy"))
    encoder = TextEncoder.from_pretrained(str(encoder_dir), layers=[1, 2, 3, 4], max_len=24)
    for record, arrays in pink_samples[:6] + val_samples[:2]:
        feats, mask = encoder.encode([record["caption"]])
        torch.testing.assert_close(torch.from_numpy(arrays["text"]).float(), feats[0][mask[0]],
                                   rtol=2.0 ** -11 + 1e-5, atol=1e-6)
    # the encoder has a word for the concept: " pink" is one token, as "red" is
    assert len(encoder.tokenizer(" pink")["input_ids"]) == len(encoder.tokenizer(" red")["input_ids"]) == 1


def test_seen_concept_prompts_are_the_streams_own_and_their_references_pretraining_captions():
    from data.shapes import concept_seen_prompts

    train = ConceptWorld(32, 0, split="train")
    seen = concept_seen_prompts()
    assert len(seen) == 8 and all("pink" in p and len(parse_caption(p).objects) == 2 for p in seen)
    assert all(train._in_stream(parse_caption(p)) for p in seen)  # the LoRA's own distribution
    refs = concept_reference_prompts(seen=True)
    assert refs[0] == "a red square above a green circle" and refs[7] == "a green triangle above a red square"
    base_captions = set(ShapesWorld(32, 0).training_captions())
    assert all(r in base_captions for r in refs)
    assert not set(seen) & set(concept_prompts())
