"""Stages that sample from prompts instead of reading images (GRPO, DPO, TDM).

Each step draws its prompts from the world's training captions by (seed, step), and each
rank draws its noise from (seed, step, rank), so a resumed run samples exactly what the
uninterrupted one did. Shared here: the prompt draw, text features with the empty
prompt beside them, RoPE positions of the stage's latent grid, and the velocity closure
`velocity(x, t_B, conditional)` that trainer/flow.py and rl/sde.py sample with.
"""

import numpy as np
import torch

from trainer.config import TrainConfig
from trainer.model import positions
from trainer.objectives import sample_seed
from trainer.parallel import Dist
from trainer.stage import Stage


class PromptedStage(Stage):
    """Prompts, text features, positions and velocities for stages that sample their own
    training inputs. Subclasses name their settings section (`section`: stage.grpo, ...)."""

    section = ""

    def __init__(self, cfg: TrainConfig, d: Dist, data, resume_dir: str | None):
        super().__init__(cfg, d, data, resume_dir)
        kind = cfg.stage.kind
        self.g = getattr(cfg.stage, self.section)
        needs_world = self.draws_prompts()
        if data.encoder is None or not hasattr(data.latents, "decode") or (needs_world and data.world is None):
            raise ValueError(f"stage.kind={kind} needs a text encoder (data.encoder_path), a latent decoder "
                             "(data.vae_path)" + (" and a world for prompts and rewards (data.world=shapes)"
                                                  if needs_world else ""))
        self.prompts = sorted(data.world.training_captions()) if data.world is not None else []
        side = cfg.data.image_size // data.latents.downsample
        self.latent_hw = (side, side)
        self.tokens = (side // cfg.model.patch_size) ** 2

    def draws_prompts(self) -> bool:
        """Whether this stage samples from the world's captions (False: it reads its inputs)."""
        return True

    def _seed(self, step: int, purpose: str) -> int:
        """A seed of this rank's draws for (step, purpose)."""
        return sample_seed(self.cfg.seed, step * 4096 + self.d.rank, f"{self.section}:{purpose}")

    def draw_prompts(self, step: int, total: int, purpose: str = "prompts") -> list[str]:
        """This rank's share of `total` prompts drawn for the step (every rank draws the same
        list, then takes its slice; without replacement while the captions last)."""
        rng = np.random.default_rng(sample_seed(self.cfg.seed, step, f"{self.section}:{purpose}"))
        n = len(self.prompts)
        idx = rng.choice(n, total, replace=total > n)
        per_rank = total // self.d.world_size
        chosen = [self.prompts[i] for i in idx]
        return chosen[self.d.rank * per_rank:(self.d.rank + 1) * per_rank]

    def positions(self, text_len: int) -> torch.Tensor:
        """RoPE positions of `[text | image]` for this stage's latent grid, on the device."""
        h, w = self.latent_hw
        p = self.cfg.model.patch_size
        return positions(text_len, h // p, w // p).to(self.d.device)

    def _text(self, prompts: list[str]):
        """(text, mask, null text, null mask) on the device: the prompts' features and the empty prompt's."""
        text, mask = self.data.encoder.encode(prompts)
        null, null_mask = self.data.encoder.encode([""] * len(prompts))
        dev = self.d.device
        return text.to(dev), mask.to(dev), null.to(dev), null_mask.to(dev)

    def _velocity(self, model, text, mask, null, null_mask):
        """velocity(x, t_B, conditional) of `model` for this batch's prompts (rl/sde.py's signature)."""
        pos = self.positions(text.shape[1])

        def velocity(x_BLC, t_B, conditional=True):
            if conditional:
                return model(x_BLC, text, t_B, pos, mask).float()
            return model(x_BLC, null, t_B, pos, null_mask).float()

        return velocity
