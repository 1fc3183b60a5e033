"""Settings of the TDM distillation stage (`stage.tdm`), part of the trainer's config schema."""

from dataclasses import dataclass


@dataclass
class TDMConfig:
    """Trajectory Distribution Matching (distill/tdm.py). One optimizer step of the loop is
    one iteration: the student rolls out `segments` deterministic steps from noise, then
    `fake_updates` fake-score updates and one student update on those rollouts.

    The student is `stage.lora.rank > 0` ? a LoRA on the teacher ("Turbo as a LoRA") : full
    weights initialised from the teacher (`checkpoint.init_from`). Its learning rate is
    `optimizer.lr`; the fake score's is `fake_lr_ratio` times that, on the same schedule.
    """

    segments: int = 8  # K: the student's sampling steps
    # The student's pinned timestep shift: its K segment boundaries are
    # trainer.flow.sampling_times(K, mu=mu), whatever the resolution (Turbo pins 1.15).
    mu: float = 1.15
    guidance: float = 3.0  # the teacher's guidance in the student's target (Krea form: c + g (c - u))
    fake_updates: int = 1  # fake-score updates per student update (TDM alternates 1:1)
    fake_lr_ratio: float = 5.0  # TDM: fake score 2e-5, student a fifth of it
    # Where the fake score learns the student's distribution: the student's clean prediction
    # x0_hat at segment start t_k is moved along its own ODE to t_mid (the segment's end, or a
    # uniform point inside it with random_mid), then forward-noised with fresh noise to t,
    # uniform in (t_mid, t_k) with `within_segment`, else in (t_mid, 1). On the exact 2-D
    # mixture (tests/distill) the segment's end and t inside the segment distil fastest.
    random_mid: bool = False
    within_segment: bool = True
    snr_cap: float = 5.0  # the fake score's loss weight min(SNR_t, snr_cap)
    huber_c: float = 1e-3  # pseudo-Huber constant of the student's loss
    t_min: float = 0.02  # times are kept in [t_min, 1 - t_min] where the model is evaluated off the boundary
    micro_batch: int = 16  # images per forward (per rank)

    def validate(self) -> None:
        from trainer.config import NON_NEGATIVE, POSITIVE, check

        check("stage.tdm", self, segments=POSITIVE, guidance=NON_NEGATIVE, fake_updates=POSITIVE,
              fake_lr_ratio=POSITIVE, snr_cap=POSITIVE, huber_c=POSITIVE, micro_batch=POSITIVE)
        if not 0 <= self.t_min < 0.25:
            raise ValueError(f"stage.tdm.t_min must be in [0, 0.25), got {self.t_min}")
