"""VQAScore-style reward: the probability that a Qwen3-VL answers "Yes".

For each image the model is asked yes/no questions through its own chat template,

    <|im_start|>user
    <|vision_start|><|image_pad|>...<|vision_end|>Is there a red object? Answer Yes or No.<|im_end|>
    <|im_start|>assistant

and a question's value is P("Yes") at the next position, a softmax over the full
vocabulary as VQAScore (Lin et al., 2024) takes it: mass the model puts on anything
other than "Yes" (including "No", " yes", a preamble) counts against the image.
With `questions="rubric"` the questions are the prompt's rubric requirements
(rubric.decompose, shapes-world prompts only) and the score is their mean; with
`questions="prompt"` one question per image, VQAScore's own: 'Does this image show
"<prompt>"?', for any prompt.

Inputs are built from the checkpoint's tokenizer, image processor and chat template
exactly as `Qwen3VLProcessor` builds them (tests/rl/test_rewards.py compares the two,
the reference being the processor transformers loads from the same folder), batched
and left-padded so only the last position's logits are computed.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoTokenizer, Qwen3VLForConditionalGeneration, Qwen3VLProcessor

from rl.rewards import Reward, RewardOutput, check_inputs
from rl.rewards.rubric import decompose, kind_details

ANSWER_SUFFIX = " Answer Yes or No."
PROMPT_QUESTION = 'Does this image show "{}"?'


def _single_token(tokenizer, word: str) -> int:
    ids = tokenizer.encode(word, add_special_tokens=False)
    if len(ids) != 1:
        raise ValueError(f"the VLM's tokenizer splits {word!r} into {len(ids)} tokens {ids}; P({word!r}) "
                         f"at one position needs it to be a single token")
    return ids[0]


class VLMYesNoReward(Reward):
    """Mean P("Yes") over a prompt's questions, from a Qwen3-VL (see the module docstring).

    details (questions="rubric"): the mean P("Yes") of each requirement kind, laid out
    as rubric.kind_details does. (image, question) pairs run `batch_size` at a time,
    left-padded, so only the last position's logits are computed.
    """

    name = "vlm"

    def __init__(self, model: Qwen3VLForConditionalGeneration, tokenizer, image_processor,
                 chat_template: str | None = None, questions: str = "rubric", batch_size: int = 16,
                 name: str | None = None):
        if questions not in ("rubric", "prompt"):
            raise ValueError(f"questions must be 'rubric' or 'prompt', got {questions!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.chat_template = chat_template or tokenizer.chat_template
        if self.chat_template is None:
            raise ValueError("the VLM has no chat template (chat_template.jinja / .json in its folder)")
        self.yes_id = _single_token(tokenizer, "Yes")
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.image_token_id = model.config.image_token_id
        self.image_token = tokenizer.convert_ids_to_tokens(self.image_token_id)
        self.questions = questions
        self.batch_size = batch_size
        self.name = name or self.name

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, device: str | torch.device = "cpu",
                        dtype: torch.dtype = torch.float32, **kwargs) -> "VLMYesNoReward":
        """A Qwen3-VL checkpoint folder: model, tokenizer, image processor and chat template,
        each read the way `Qwen3VLProcessor.from_pretrained` reads it."""
        path = str(path)
        if not Path(path).is_dir():
            raise ValueError(f"VLM path {path!r} is not a folder")
        model = Qwen3VLForConditionalGeneration.from_pretrained(path, dtype=dtype).to(device)
        # The processor config holds the chat template (chat_template.jinja, or the older
        # chat_template.json that real Qwen3-VL checkpoints ship); no processor is built.
        processor_dict, _ = Qwen3VLProcessor.get_processor_dict(path)
        return cls(model, AutoTokenizer.from_pretrained(path), AutoImageProcessor.from_pretrained(path),
                   chat_template=processor_dict.get("chat_template"), **kwargs)

    def _questions(self, prompt: str) -> list[tuple[str, str]]:
        """(kind, question text) pairs asked about an image of `prompt`."""
        if self.questions == "prompt":
            return [("prompt", PROMPT_QUESTION.format(prompt) + ANSWER_SUFFIX)]
        return [(r.kind, r.question + ANSWER_SUFFIX) for r in decompose(prompt)]

    def inputs(self, images: list[Image.Image], questions: list[str]) -> dict[str, torch.Tensor]:
        """The model's inputs for one chat per (image, question), left-padded; what
        Qwen3VLProcessor(text=chats, images=images) returns."""
        chats = [self.tokenizer.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}],
            chat_template=self.chat_template, add_generation_prompt=True, tokenize=False) for q in questions]
        vision = self.image_processor(images=images, return_tensors="pt")
        # The template writes one image placeholder; the language model reads one per
        # merged patch (merge_size^2 patches of the vision tower).
        counts = (vision["image_grid_thw"].prod(-1) // self.image_processor.merge_size ** 2).tolist()
        if any(chat.count(self.image_token) != 1 for chat in chats):
            raise ValueError(f"the chat template must write one {self.image_token} for an image part")
        chats = [chat.replace(self.image_token, self.image_token * n) for chat, n in zip(chats, counts)]
        text = self.tokenizer(chats, padding=True, padding_side="left", return_tensors="pt")
        ids = text["input_ids"]
        # M-RoPE places image tokens on a (time, height, width) grid: type 1 marks them.
        return {"input_ids": ids, "attention_mask": text["attention_mask"],
                "mm_token_type_ids": (ids == self.image_token_id).long(),
                "pixel_values": vision["pixel_values"], "image_grid_thw": vision["image_grid_thw"]}

    @torch.no_grad()
    def yes_probability(self, images: list[Image.Image], questions: list[str]) -> torch.Tensor:
        """P("Yes") as the model's next token after each (image, question) chat; float32 (N,)."""
        out = []
        device = self.model.device
        for start in range(0, len(questions), self.batch_size):
            batch = self.inputs(images[start:start + self.batch_size], questions[start:start + self.batch_size])
            batch = {k: v.to(device) for k, v in batch.items()}
            logits = self.model(**batch, logits_to_keep=1, use_cache=False).logits[:, -1]
            out.append(torch.softmax(logits.float(), dim=-1)[:, self.yes_id].cpu())
        return torch.cat(out)

    def __call__(self, images_BHWC: np.ndarray, prompts: list[str]) -> RewardOutput:
        check_inputs(images_BHWC, prompts)
        asked = [self._questions(p) for p in prompts]
        pil = [Image.fromarray(image) for image in images_BHWC]
        flat_images = [pil[b] for b, qs in enumerate(asked) for _ in qs]
        p_yes = self.yes_probability(flat_images, [q for qs in asked for _, q in qs]).tolist()
        values, i = [], 0
        for qs in asked:
            values.append([(kind, p_yes[i + j]) for j, (kind, _) in enumerate(qs)])
            i += len(qs)
        scores = torch.tensor([np.mean([v for _, v in vs]) for vs in values], dtype=torch.float32)
        return RewardOutput(scores, kind_details(values) if self.questions == "rubric" else {})


def build(world=None, path: str | os.PathLike | None = None, **options) -> VLMYesNoReward:
    """The registry's entry (rl.rewards.build_reward): options {"path": checkpoint folder, ...}."""
    if path is None:
        raise ValueError("the vlm reward needs options {'vlm': {'path': <Qwen3-VL checkpoint folder>}}")
    return VLMYesNoReward.from_pretrained(path, **options)
