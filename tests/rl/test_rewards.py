"""Rewards: rubric decomposition, the exact rubric checker against score_caption, the VLM
yes-probability against transformers' own forward, weighted combination and GRPO advantages."""

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import (Qwen2VLImageProcessorPil, Qwen3VLForConditionalGeneration, Qwen3VLProcessor,
                          Qwen3VLVideoProcessor)

from data.shapes import BACKGROUNDS, Scene, ShapesWorld, parse_caption, scene_to_caption
from data.shapes_check import score_caption
from data.text import tiny_encoder_config, train_tokenizer
from rl.rewards import build_reward, group_advantages
from rl.rewards.combine import WeightedReward
from rl.rewards.rubric import ShapesRubricReward, decompose
from rl.rewards.vlm import VLMYesNoReward

# Qwen3-VL's chat layout (no default system turn; an image part becomes its vision block).
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def world():
    return ShapesWorld(image_size=32, seed=0)


def render(world, caption, seed):
    return world.render(caption, np.random.default_rng(seed))


# ---- decomposition ---------------------------------------------------------------------------
def test_decompose_gives_the_pinned_requirements():
    expected = {
        "a red circle": [
            ("entity", "entity:red", "red is present", "Is there a red object?"),
            ("attribute", "attribute:red:circle", "the red object is a circle", "Is the red object a circle?"),
            ("count", "count:1", "exactly 1 object is present", "Is there exactly one object?"),
        ],
        "a purple triangle above a green circle": [
            ("entity", "entity:purple", "purple is present", "Is there a purple object?"),
            ("attribute", "attribute:purple:triangle", "the purple object is a triangle",
             "Is the purple object a triangle?"),
            ("entity", "entity:green", "green is present", "Is there a green object?"),
            ("attribute", "attribute:green:circle", "the green object is a circle", "Is the green object a circle?"),
            ("count", "count:2", "exactly 2 objects are present", "Are there exactly two objects?"),
            ("spatial", "spatial:purple:above:green", "the purple triangle is above the green circle",
             "Is the purple triangle above the green circle?"),
        ],
        "an orange circle to the left of a purple triangle": [
            ("entity", "entity:orange", "orange is present", "Is there an orange object?"),
            ("attribute", "attribute:orange:circle", "the orange object is a circle", "Is the orange object a circle?"),
            ("entity", "entity:purple", "purple is present", "Is there a purple object?"),
            ("attribute", "attribute:purple:triangle", "the purple object is a triangle",
             "Is the purple object a triangle?"),
            ("count", "count:2", "exactly 2 objects are present", "Are there exactly two objects?"),
            ("spatial", "spatial:orange:left_of:purple", "the orange circle is to the left of the purple triangle",
             "Is the orange circle to the left of the purple triangle?"),
        ],
    }
    for prompt, reqs in expected.items():
        assert [(r.kind, r.id, r.statement, r.question) for r in decompose(prompt)] == reqs, prompt
    spatial = decompose("a blue square to the right of a pink circle")[-1]
    assert spatial.args == ("blue", "right of", "pink")


@pytest.mark.parametrize("prompt", ["a red hexagon", "a red circle near a blue square", "a cat",
                                    "a red circle above a red square", "an red circle"])
def test_decompose_rejects_prompts_the_world_cannot_draw(prompt):
    with pytest.raises(ValueError, match=f"prompt '{prompt}'"):
        decompose(prompt)


# ---- the exact rubric ------------------------------------------------------------------------
def _perturbed(caption: str) -> list[str]:
    """Captions that differ from `caption` in one respect: a colour, a shape, the relation, the count."""
    scene = parse_caption(caption)
    (c1, s1), *rest = scene.objects
    other_shape = {"circle": "square", "square": "triangle", "triangle": "circle"}[s1]
    used = {c for c, _ in scene.objects}
    other_colour = next(c for c in ("red", "green", "blue", "yellow") if c not in used)
    out = [scene_to_caption(Scene(((c1, other_shape), *rest), scene.relation)),
           scene_to_caption(Scene(((other_colour, s1), *rest), scene.relation))]
    if scene.relation is None:
        out.append(scene_to_caption(Scene(((c1, s1), (other_colour, other_shape)), "below")))
    else:
        swapped = {"above": "below", "below": "above", "left of": "right of", "right of": "left of"}[scene.relation]
        out += [scene_to_caption(Scene(scene.objects, swapped)), scene_to_caption(Scene(scene.objects[:1]))]
    return out


def test_rubric_all_pass_iff_score_caption_passes(world):
    rubric = ShapesRubricReward()
    images, prompts = [], []
    for i in range(40):
        image, caption = world.sample(i)
        images.append(image)  # the world's own (correct) images
        prompts.append(caption)
        for j, wrong in enumerate(_perturbed(caption)):  # an image of a different caption, scored against this one
            images.append(render(world, wrong, 1000 * i + j))
            prompts.append(caption)
    images.append(np.full((32, 32, 3), BACKGROUNDS["dark"], np.uint8))  # nothing drawn
    prompts.append("a red circle")
    out = rubric(np.stack(images), prompts)
    truth = torch.tensor([all(score_caption(im, p).values()) for im, p in zip(images, prompts)], dtype=torch.float32)
    assert torch.equal(out.details["all"], truth)
    assert torch.equal(out.scores == 1.0, truth.bool())
    assert truth.sum() >= 40 and (1 - truth).sum() >= 100  # both outcomes well represented
    assert out.scores.dtype == torch.float32 and ((out.scores >= 0) & (out.scores <= 1)).all()


def test_rubric_scores_the_mean_of_requirement_results(world):
    rubric = ShapesRubricReward()
    prompts = ["a red circle above a green square", "a red circle above a green square", "a red circle",
               "a red circle", "a red circle"]
    drawn = ["a red circle below a green square",  # all but the relation: 5 of 6
             "a red triangle above a blue square",  # red, count and... red's shape wrong, green missing: 2 of 6
             "a red square",  # colour and count, not the shape: 2 of 3
             "a blue square",  # only the count: 1 of 3
             "a red circle to the left of a blue square"]  # red circle, but two objects: 2 of 3
    out = rubric(np.stack([render(world, c, 7) for c in drawn]), prompts)
    torch.testing.assert_close(out.scores, torch.tensor([5 / 6, 2 / 6, 2 / 3, 1 / 3, 2 / 3]), rtol=0, atol=1e-7)
    torch.testing.assert_close(out.details["entity"], torch.tensor([1.0, 0.5, 1.0, 0.0, 1.0]))
    torch.testing.assert_close(out.details["attribute"], torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0]))
    torch.testing.assert_close(out.details["count"], torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0]))
    # one-object prompts have no spatial requirement: 1.0, score_caption's convention
    torch.testing.assert_close(out.details["spatial"], torch.tensor([0.0, 0.0, 1.0, 1.0, 1.0]))
    torch.testing.assert_close(out.details["all"], torch.zeros(5))


def _painted(mask_HW: np.ndarray) -> np.ndarray:
    """A dark image with `mask_HW` painted in the palette's red."""
    from data.shapes import COLOURS

    image = np.full((*mask_HW.shape, 3), BACKGROUNDS["dark"], np.uint8)
    image[mask_HW] = COLOURS["red"]
    return image


def test_soft_rubric_scores_shapes_by_their_margin(world):
    # Hand-drawn blobs whose statistics are known: a 12x12 square fills its box (fill 1,
    # upper 0.5); the same with 2x2 corners cut fills 128/144; a 12x12 box with 3x3 corners
    # cut fills 108/144. Margins (data.shapes): square min(upper - 0.4, fill - 0.93), circle
    # min(upper - 0.4, 0.93 - fill); the score is sigmoid(margin / soft).
    square = np.zeros((32, 32), bool)
    square[10:22, 10:22] = True
    cut2, cut3 = square.copy(), square.copy()
    for r, c in ((10, 10), (10, 20), (20, 10), (20, 20)):
        cut2[r:r + 2, c:c + 2] = False
    for r, c in ((10, 10), (10, 19), (19, 10), (19, 19)):
        cut3[r:r + 3, c:c + 3] = False
    soft = 0.03
    rubric = ShapesRubricReward(soft=soft)
    images = np.stack([_painted(m) for m in (square, cut2, cut3, square)])
    prompts = ["a red square", "a red square", "a red square", "a red circle"]
    out = rubric(images, prompts)
    sigmoid = lambda m: 1 / (1 + np.exp(-m / soft))  # noqa: E731
    attribute = [sigmoid(min(0.1, 1 - 0.93)), sigmoid(128 / 144 - 0.93), sigmoid(108 / 144 - 0.93),
                 sigmoid(min(0.1, 0.93 - 1))]
    # entity and count pass in every image: score = (1 + attribute + 1) / 3
    expected = torch.tensor([(2 + a) / 3 for a in attribute], dtype=torch.float32)
    torch.testing.assert_close(out.scores, expected, rtol=0, atol=1e-6)
    # the logged pass rates stay the exact 0/1 results
    torch.testing.assert_close(out.details["attribute"], torch.tensor([1.0, 0.0, 0.0, 0.0]))
    torch.testing.assert_close(out.details["all"], torch.tensor([1.0, 0.0, 0.0, 0.0]))


def test_soft_rubric_is_above_half_exactly_where_the_check_passes(world):
    exact, soft = ShapesRubricReward(), ShapesRubricReward(soft=0.03)
    images, prompts = [], []
    for i in range(30):
        image, caption = world.sample(i)
        for j, wrong in enumerate([caption, *_perturbed(caption)]):
            images.append(render(world, wrong, 100 * i + j))
            prompts.append(caption)
    images, hard = np.stack(images), exact(np.stack(images), prompts)
    out = soft(images, prompts)
    for i, prompt in enumerate(prompts):
        reqs = decompose(prompt)
        results = soft._check(images[i], reqs)
        for req, (ok, score) in zip(reqs, results):
            assert (score > 0.5) == ok, (prompt, req.id, score)
    assert torch.equal(out.details["all"], hard.details["all"])
    assert (out.scores != hard.scores).any()  # the soft scores are not the 0/1 ones


def test_rewards_reject_images_in_another_format(world):
    rubric = ShapesRubricReward()
    image = render(world, "a red circle", 0)
    with pytest.raises(ValueError, match="uint8"):
        rubric(torch.from_numpy(image[None]).permute(0, 3, 1, 2).float() / 127.5 - 1, ["a red circle"])
    with pytest.raises(ValueError, match="one prompt per image"):
        rubric(image[None], ["a red circle", "a blue square"])


# ---- group advantages --------------------------------------------------------------------------
def _numpy_advantages(x, groups, eps=1e-4):
    x, groups = np.asarray(x, np.float64), np.asarray(groups)
    out = np.empty_like(x)
    for g in np.unique(groups):
        sel = groups == g
        out[sel] = (x[sel] - x[sel].mean()) / (x[sel].std() + eps)
    return out


def test_group_advantages_are_group_relative_and_clipped():
    scores = torch.tensor([0.0, 1.0, 0.5, 0.2, 0.9, 0.2, 0.9, 0.3, 0.3, 0.3])
    groups = torch.tensor([7, 7, 7, 2, 2, 2, 2, 5, 5, 5])  # any ids; the last group is constant
    adv = group_advantages(scores, groups, clip=None)
    np.testing.assert_allclose(adv.numpy(), _numpy_advantages(scores.numpy(), groups.numpy()), rtol=1e-6, atol=1e-6)
    for g in (7, 2, 5):
        assert abs(adv[groups == g].sum().item()) < 1e-5
    assert torch.equal(adv[7:], torch.zeros(3))
    # a 1-in-10 outlier: its advantage (3.0) is clipped to 2, the rest untouched
    spiky = torch.tensor([1.0] + [0.0] * 9)
    clipped = group_advantages(spiky, torch.zeros(10, dtype=torch.long), clip=2.0)
    raw = _numpy_advantages(spiky.numpy(), np.zeros(10))
    assert raw[0] > 2.9 and clipped[0].item() == 2.0
    np.testing.assert_allclose(clipped[1:].numpy(), raw[1:], rtol=1e-6)


# ---- the VLM yes-probability -------------------------------------------------------------------
VLM_PROMPTS = ["a red circle", "a purple triangle above a green circle",
               "an orange circle to the left of a blue square"]


def _processor(image_processor, tokenizer) -> Qwen3VLProcessor:
    """transformers' own Qwen3-VL processor (its video slot unused: no video is ever passed)."""
    return Qwen3VLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                            video_processor=Qwen3VLVideoProcessor(), chat_template=CHAT_TEMPLATE)


@pytest.fixture(scope="module")
def tiny_vlm(tmp_path_factory):
    """A random-weight Qwen3-VL and its processor (a trained tokenizer, the Qwen2-VL image
    processor, the chat template), saved as a checkpoint folder: (folder, model, processor)."""
    folder = tmp_path_factory.mktemp("tiny_vlm")
    corpus = [r.question + " Answer Yes or No." for p in VLM_PROMPTS for r in decompose(p)]
    corpus += [f'Does this image show "{p}"? Answer Yes or No.' for p in VLM_PROMPTS] + ["Yes", "No"]
    tokenizer = train_tokenizer(corpus, folder)
    vision_ids = {key: tokenizer.convert_tokens_to_ids(tok) for key, tok in [
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>")]}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = Qwen3VLForConditionalGeneration(tiny_encoder_config(len(tokenizer), tokenizer.pad_token_id, vision_ids))
        with torch.no_grad():  # large "Yes"/"No" logits of either sign: P("Yes") from 1e-5 to 0.3 across inputs
            for word in ("Yes", "No"):
                model.lm_head.weight[tokenizer.convert_tokens_to_ids(word)].normal_(0.0, 1.5)
    # float64, so the reward's batched, padded forward and the reference's single one agree
    # to rounding (float32 padding alone moves P("Yes") by ~1e-5 relative).
    model = model.double().eval()
    # 32 px images are resized to 64 x 64: a 4 x 4 grid of 16 px patches, 2 x 2 merged into 4 image tokens.
    image_processor = Qwen2VLImageProcessorPil(patch_size=16, temporal_patch_size=2, merge_size=2,
                                               size={"shortest_edge": 64 * 64, "longest_edge": 64 * 64},
                                               image_mean=[0.5] * 3, image_std=[0.5] * 3)
    _processor(image_processor, tokenizer).save_pretrained(str(folder))
    model.save_pretrained(str(folder))
    # The reference: transformers' own processor as it loads from the checkpoint folder
    # (the image processor class transformers picks for it, as the reward's loader does).
    return str(folder), model, Qwen3VLProcessor.from_pretrained(str(folder))


def _reference_yes(model, processor, image_HWC, question) -> float:
    """P("Yes") next, straight from transformers: the processor's chat template with the image, one forward."""
    messages = [{"role": "user", "content": [{"type": "image", "image": Image.fromarray(image_HWC)},
                                             {"type": "text", "text": question}]}]
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits[0, -1]
    return torch.softmax(logits.double(), dim=-1)[processor.tokenizer.convert_tokens_to_ids("Yes")].item()


def test_vlm_reward_is_transformers_yes_probability(world, tiny_vlm):
    folder, model, processor = tiny_vlm
    images = np.stack([render(world, p, 3) for p in VLM_PROMPTS[::-1]])  # images of other prompts: varied answers
    # 15 questions in batches of 4: batches span images, and questions of different lengths are padded
    reward = VLMYesNoReward.from_pretrained(folder, dtype=torch.float64, batch_size=4)
    out = reward(images, VLM_PROMPTS)
    expected, kinds = [], {k: [] for k in ("entity", "attribute", "count", "spatial")}
    all_refs = []
    for image, prompt in zip(images, VLM_PROMPTS):
        refs = [(r.kind, _reference_yes(model, processor, image, r.question + " Answer Yes or No."))
                for r in decompose(prompt)]
        all_refs += [v for _, v in refs]
        expected.append(np.mean([v for _, v in refs]))
        for kind, values in kinds.items():
            of_kind = [v for k, v in refs if k == kind]
            values.append(np.mean(of_kind) if of_kind else 1.0)
    torch.testing.assert_close(out.scores, torch.tensor(expected, dtype=torch.float32), rtol=1e-6, atol=1e-12)
    for kind, values in kinds.items():
        torch.testing.assert_close(out.details[kind], torch.tensor(values, dtype=torch.float32),
                                   rtol=1e-6, atol=1e-12)
    # the check tells inputs apart far beyond its tolerance: questions, and images for one question
    assert max(all_refs) > 10 * min(all_refs)
    question = decompose(VLM_PROMPTS[0])[0].question + " Answer Yes or No."
    assert abs(_reference_yes(model, processor, images[1], question) / all_refs[0] - 1) > 0.01

    whole = VLMYesNoReward(model, processor.tokenizer, processor.image_processor, chat_template=CHAT_TEMPLATE,
                           questions="prompt", batch_size=2)(images, VLM_PROMPTS)
    refs = [_reference_yes(model, processor, im, f'Does this image show "{p}"? Answer Yes or No.')
            for im, p in zip(images, VLM_PROMPTS)]
    torch.testing.assert_close(whole.scores, torch.tensor(refs, dtype=torch.float32), rtol=1e-6, atol=1e-12)
    assert whole.details == {}


def test_vlm_reward_needs_yes_as_one_token(tmp_path, tiny_vlm):
    _, model, processor = tiny_vlm
    tokenizer = train_tokenizer(["a red circle"], tmp_path, vocab_size=300)  # never saw "Yes"
    with pytest.raises(ValueError, match="'Yes'"):
        VLMYesNoReward(model, tokenizer, processor.image_processor, chat_template=CHAT_TEMPLATE)


# ---- combination ---------------------------------------------------------------------------------
def test_weighted_reward_and_per_reward_advantages(world, tiny_vlm):
    folder, model, processor = tiny_vlm
    prompts = ["a red circle above a green square"] * 3 + ["a red circle"] * 3
    drawn = ["a red circle above a green square", "a red circle below a green square",
             "a red triangle above a blue square", "a red circle", "a red square", "a blue square"]
    images = np.stack([render(world, c, 11) for c in drawn])
    rubric_scores = torch.tensor([1.0, 5 / 6, 2 / 6, 1.0, 2 / 3, 1 / 3])
    vlm_scores = VLMYesNoReward.from_pretrained(folder)(images, prompts).scores

    combined = build_reward({"rubric": 3.0, "vlm": 1.0}, world, options={"vlm": {"path": folder, "batch_size": 8}})
    assert isinstance(combined, WeightedReward)
    out = combined(images, prompts)
    torch.testing.assert_close(out.scores, (3 * rubric_scores + vlm_scores) / 4, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(out.details["rubric"], rubric_scores)
    torch.testing.assert_close(out.details["vlm"], vlm_scores, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(out.details["rubric/spatial"], torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0]))

    groups = torch.tensor([0, 0, 0, 1, 1, 1])
    adv = combined.advantages(out, groups, clip=None)
    expected = (3 * _numpy_advantages(rubric_scores.numpy(), groups.numpy())
                + _numpy_advantages(vlm_scores.numpy(), groups.numpy())) / 4
    np.testing.assert_allclose(adv.numpy(), expected, rtol=1e-5, atol=1e-6)
    assert abs(adv[:3].sum().item()) < 1e-5 and abs(adv[3:].sum().item()) < 1e-5
    clipped = combined.advantages(out, groups, clip=0.5)
    np.testing.assert_allclose(clipped.numpy(), np.clip(expected, -0.5, 0.5), rtol=1e-5, atol=1e-6)
    assert (clipped.abs() <= 0.5).all() and (clipped.abs() == 0.5).any()


def test_build_reward_rejects_what_it_cannot_build(world):
    with pytest.raises(ValueError, match="unknown or unweighted rewards \\['clip'\\]"):
        build_reward({"clip": 1.0}, world)
    with pytest.raises(ValueError, match="options must name a reward in weights"):
        build_reward({"rubric": 1.0}, world, options={"vlm": {"path": "/nowhere"}})
    with pytest.raises(ValueError, match="shapes-world images"):
        build_reward({"rubric": 1.0}, world=object())
    with pytest.raises(ValueError, match="positive sum"):
        build_reward({"rubric": 0.0}, world)
