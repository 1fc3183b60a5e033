"""The loop's parts: activation checkpointing, LR schedule, EMA, initialising from released weights."""

import math
import os
import torch

from trainer.config import OptimizerConfig, ParallelConfig
from trainer.model import K2DiT, ModelConfig, positions, save_pretrained
from trainer.optim import EMA, build_optimizer, lr_at
from trainer.parallel import Dist, parallelize

CFG = ModelConfig(
    name="t", latent_channels=3, patch_size=4, dim=64, num_blocks=2, num_heads=2, num_kv_heads=1, mlp_hidden=128,
    timestep_dim=64, text_dim=16, num_text_layers=2, text_num_heads=2, text_num_kv_heads=1, text_mlp_hidden=32,
    rope_axes=[8, 12, 12],
)  # fmt: skip
SINGLE = Dist(0, 1, 0, torch.device("cpu"), None)


def _random_model(seed=0):
    torch.manual_seed(seed)
    model = K2DiT(CFG)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.05)
    return model


def _loss_and_grads(model):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 16, CFG.in_channels, generator=g)
    text = torch.randn(2, 5, 2, 16, generator=g)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    loss = model(x, text, torch.tensor([0.3, 0.8]), positions(5, 4, 4), mask).pow(2).mean()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_activation_checkpointing_keeps_loss_and_gradients():
    plain_loss, plain_grads = _loss_and_grads(_random_model())
    ac = parallelize(_random_model(), ParallelConfig(activation_checkpoint="full"), SINGLE)
    wrapped = [type(b).__name__ for b in ac.blocks]
    assert all(name == "CheckpointWrapper" for name in wrapped), wrapped
    ac_loss, ac_grads = _loss_and_grads(ac)
    assert torch.equal(plain_loss, ac_loss)
    ac_grads = {n.replace("._checkpoint_wrapped_module", ""): g for n, g in ac_grads.items()}
    assert ac_grads.keys() == plain_grads.keys()
    for n in plain_grads:
        torch.testing.assert_close(ac_grads[n], plain_grads[n], rtol=1e-6, atol=1e-7, msg=n)


def test_lr_warmup_then_cosine_to_floor():
    cfg = OptimizerConfig(lr=1e-3, warmup_steps=10, min_lr_ratio=0.1)
    lrs = [lr_at(s, 110, cfg) for s in range(110)]
    assert math.isclose(lrs[0], 1e-4) and math.isclose(lrs[9], 1e-3)
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:10]))  # warmup rises
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))  # cosine falls
    assert math.isclose(lrs[60], 1e-4 + 0.5 * 9e-4)  # halfway down the cosine
    assert math.isclose(lr_at(110, 110, cfg), 1e-4)


def test_no_weight_decay_on_norms_and_modulation_tables():
    model = _random_model()
    opt = build_optimizer(model, OptimizerConfig(weight_decay=0.1))
    decayed = {id(p) for p in opt.param_groups[0]["params"]}
    names = {n for n, p in model.named_parameters() if id(p) in decayed}
    assert "blocks.0.attn.q.weight" in names or any(".attn." in n for n in names)
    assert not any("norm" in n or n.endswith("mod") for n in names), sorted(names)


def test_ema_tracks_parameters_and_swaps():
    model = _random_model()
    ema = EMA(model, decay=0.5)
    before = [p.detach().clone() for p in model.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update()
    for p0, s in zip(before, ema.shadow):
        torch.testing.assert_close(s, p0 + 0.5)  # halfway to the new weights
    live = [p.detach().clone() for p in model.parameters()]
    ema.swap()
    for p, s0 in zip(model.parameters(), before):
        torch.testing.assert_close(p.detach(), s0 + 0.5)
    ema.swap()
    for p, l0 in zip(model.parameters(), live):
        assert torch.equal(p.detach(), l0)


def _init_config(tmp_path, model_cfg, init_from):
    from trainer.config import TrainConfig

    cfg = TrainConfig(name="init", run_root=str(tmp_path / "runs"), device="cpu", model=model_cfg)
    cfg.data.text_layers = [1, 2]  # two tapped layers of the tiny encoder (width 128)
    cfg.stage.steps, cfg.stage.global_batch_size, cfg.stage.micro_batch_size = 1, 2, 2
    cfg.checkpoint.init_from = init_from
    cfg.log.tensorboard = False
    return cfg


def test_training_starts_from_released_weights(tmp_path):
    from trainer.loop import setup

    model_cfg = ModelConfig(**{**CFG.__dict__, "text_dim": 128})
    torch.manual_seed(3)
    released = K2DiT(model_cfg)
    for p in released.parameters():
        torch.nn.init.normal_(p, std=0.05)
    path = save_pretrained(released, tmp_path / "release", fmt="release")
    run = setup(_init_config(tmp_path, model_cfg, str(path)))
    got = run.stage.trainables["model"].module.state_dict()
    for name, tensor in released.state_dict().items():
        assert torch.equal(got[name], tensor), name


def test_released_weights_of_another_size_are_refused_by_name(tmp_path):
    from trainer.loop import setup

    path = save_pretrained(_random_model(seed=3), tmp_path / "release", fmt="diffusers")  # text_dim 16
    cfg = _init_config(tmp_path, ModelConfig(**{**CFG.__dict__, "text_dim": 128}), str(path))
    try:
        setup(cfg)
    except ValueError as e:
        assert "text" in str(e), e
    else:
        raise AssertionError("weights of another size were loaded without complaint")


def test_next_stage_starts_from_previous_stage_ema(tmp_path):
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    from tests.conftest import run_training
    from trainer.config import TrainConfig
    from trainer.loop import setup
    from trainer.model.config import ModelConfig as MC

    root = str(tmp_path / "runs")
    run_training("experiment=test_tiny", f"run_root={root}", "name=stage1", "stage.steps=3")
    dcp_to_torch_save(os.path.join(root, "stage1", "checkpoints", "step_00000003"), str(tmp_path / "s1.pt"))
    saved = torch.load(tmp_path / "s1.pt", weights_only=False)

    import yaml

    tiny = yaml.safe_load(open(os.path.join(os.path.dirname(__file__), "../../configs/model/tiny.yaml")))
    cfg = TrainConfig(name="stage2", run_root=root, device="cpu", model=MC(**tiny))
    cfg.stage.global_batch_size = cfg.stage.micro_batch_size = 2
    cfg.checkpoint.init_from = os.path.join(root, "stage1")
    cfg.log.tensorboard = False
    got = setup(cfg).stage.trainables["model"].module.state_dict()
    assert saved["ema"].keys() == {n for n, _ in K2DiT(MC(**tiny)).named_parameters()}
    for name, tensor in saved["ema"].items():
        assert torch.equal(got[name], tensor), name
    assert not torch.equal(saved["ema"]["final.linear.weight"], saved["model"]["final.linear.weight"])
