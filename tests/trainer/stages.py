"""Stages for the loop's tests, loaded by `stage.kind=tests.trainer.stages:<Class>`.

`TwoModelStage` has the shape of the later recipe stages (TDM: a student and a
fake score on two optimizers; DPO/GRPO: a frozen reference): a trainable "model",
a second trainable "critic" with its own optimizer, learning rate and EMA, a frozen
"reference", and a tensor of its own state. `NaNStage` turns its loss to NaN from
step 4 on; `PoisonStage` puts an inf into a weight at step 5.
"""

import torch

from trainer.config import OptimizerConfig
from trainer.flow import flow_loss
from trainer.stage import FlowStage, Trainable, accumulate, build_dit, update


class TwoModelStage(FlowStage):
    def __init__(self, cfg, d, data, resume_dir):
        super().__init__(cfg, d, data, resume_dir)
        critic, info = build_dit(cfg, d)
        critic_opt = OptimizerConfig(**{**cfg.optimizer.__dict__, "lr": cfg.optimizer.lr * 0.5})
        self.critic = critic
        self.trainables["critic"] = Trainable.create(critic, cfg, info, ema_decay=0.5, optimizer_cfg=critic_opt)
        self.reference, self.frozen["reference"] = build_dit(cfg, d, trainable=False)
        self.frozen["reference"]["source"] = "random init, seed of the run"
        self.loss_ema = torch.zeros(())  # the stage's own state: checkpointed and restored

    def step(self, step):
        lr = self.set_lr(step)
        model, critic = self.trainables["model"], self.trainables["critic"]

        def model_loss(batch):
            n = self.objective.noised(batch)
            v = self.model(n["xt"], batch.text, n["t"], n["pos"], batch.text_mask)
            with torch.no_grad():
                v_ref = self.reference(n["xt"], batch.text, n["t"], n["pos"], batch.text_mask)
            flow = flow_loss(v, n["x0"], n["eps"])
            return flow + 0.1 * (v - v_ref).square().mean(), {"flow": flow.detach()}

        loss, terms, data_s = accumulate(self.cfg, self.d, self.data.loader, model_loss, [self.model])
        grad_norm, applied = update(model, self.cfg.optimizer.grad_clip, step)

        def critic_loss(batch):  # regresses the updated model's prediction
            n = self.objective.noised(batch)
            with torch.no_grad():
                target = self.model(n["xt"], batch.text, n["t"], n["pos"], batch.text_mask)
            v = self.critic(n["xt"], batch.text, n["t"], n["pos"], batch.text_mask)
            return (v - target).square().mean(), {}

        critic_l, _, data_c = accumulate(self.cfg, self.d, self.data.loader, critic_loss, [self.critic])
        grad_norm_c, applied_c = update(critic, self.cfg.optimizer.grad_clip, step, "critic")
        self.loss_ema = 0.9 * self.loss_ema + 0.1 * loss.detach().cpu()
        return {"loss": loss, "grad_norm": grad_norm, "grad_norm_critic": grad_norm_c, "critic_loss": critic_l,
                "lr": lr, "data_s": data_s + data_c, "skipped": not (applied and applied_c), **terms}

    def state_dict(self):
        return {"loss_ema": self.loss_ema}

    def load_state_dict(self, sd):
        self.loss_ema = sd["loss_ema"].clone()


class NaNStage(FlowStage):
    def __init__(self, cfg, d, data, resume_dir):
        super().__init__(cfg, d, data, resume_dir)
        real = self.objective.loss

        def loss(model, batch):
            value, terms = real(model, batch)
            return (value * float("nan") if self.objective.step >= 3 else value), terms

        self.objective.loss = loss


class PoisonStage(FlowStage):
    """A step whose gradients are finite but whose update leaves an inf in one weight
    (what an overflowing optimizer or a bad learning rate does): from step 5 on."""

    def step(self, step):
        values = super().step(step)
        if step == 4:
            with torch.no_grad():
                next(p for n, p in self.model.named_parameters() if n.endswith("final.linear.weight"))[0, 0] = float("inf")
        return values
