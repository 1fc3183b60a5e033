"""The fast paths compute what the plain ones do: FlexAttention's key-padding block mask
against a float64 softmax, the model under each attention backend, padding trimmed
before sampling, the device-flag EMA and fused AdamW skip, the loop's skip counter."""

import os
import socket
import subprocess
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from trainer.config import OptimizerConfig
from trainer.loop import SkippedSteps
from trainer.model import K2DiT, ModelConfig, positions
from trainer.model.attention import (attend, flex_key_padding, key_padding, split_key_padding, valid_first,
                                     varlen_segments)
from trainer.optim import EMA, build_optimizer, skips_on_device, step_unless
from trainer.model.layers import fuse_projections, unfuse_projections
from trainer.sample import trim_padding
from tests.conftest import ROOT, train_cmd, train_env
from trainer.checkpoint import list_checkpoints
from trainer.stage import FlowStage, Trainable, update

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "model"


def tiny_cfg() -> ModelConfig:
    return ModelConfig(**OmegaConf.to_container(OmegaConf.load(CONFIGS / "tiny.yaml")))


def reference_attention(q, k, v, valid_BS):
    """Softmax over the valid keys in float64, each query head reading kv head h // (H/G)."""
    H, G = q.shape[1], k.shape[1]
    k, v = (t.double().repeat_interleave(H // G, dim=1) for t in (k, v))
    scores = q.double() @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    scores = scores.masked_fill(~valid_BS[:, None, None, :], float("-inf"))
    return scores.softmax(-1) @ v


def planted_valid(B: int, S: int) -> torch.Tensor:
    """Rows with full, partial and empty 128-blocks of keys: row 0 loses 100..300 (block 0
    partial, block 1 empty, block 2 partial), row 1 only its last 20 keys."""
    valid = torch.ones(B, S, dtype=torch.bool)
    valid[0, 100:300] = False
    valid[1, S - 20:] = False
    return valid


def test_flex_block_mask_lists_full_partial_and_empty_blocks():
    valid = planted_valid(2, 330)  # 3 blocks, the last one 74 keys long
    bm = flex_key_padding(valid)
    # Row 0: block 0 partial (0..99 valid), block 1 all padding, block 2 partial (300..329 valid only).
    # Row 1: blocks 0, 1 full; block 2 partial (its first 54 keys valid).
    assert bm.full_kv_num_blocks[:, 0, 0].tolist() == [0, 2]
    assert bm.kv_num_blocks[:, 0, 0].tolist() == [2, 1]
    assert sorted(bm.kv_indices[0, 0, 0, :2].tolist()) == [0, 2]
    assert bm.kv_indices[1, 0, 0, 0].item() == 2
    dense = bm.to_dense()[:, 0, 0]  # (B, n) 1 where a key block is visited
    assert dense.tolist() == [[1, 0, 1], [1, 1, 1]]


def test_flex_attention_matches_float64_softmax_over_valid_keys():
    gen = torch.Generator().manual_seed(0)
    B, H, G, S, K = 2, 4, 2, 330, 32
    q, k, v = (torch.randn(B, n, S, K, generator=gen) for n in (H, G, G))
    valid = planted_valid(B, S)
    ref = reference_attention(q, k, v, valid)
    for backend in ("flex", "sdpa"):
        out = attend(q, k, v, key_padding(valid, backend))
        err = ((out.double() - ref).norm() / ref.norm()).item()
        assert err < 1e-5, (backend, err)
    # Padded keys and values do not reach the output, whatever they hold (finite: the model
    # zeroes padded text features first, since 0·NaN would leak through any kernel).
    pad = ~valid[:, None, :, None]
    k_bad, v_bad = k.masked_fill(pad, 1e4), v.masked_fill(pad, -1e4)
    out = attend(q, k, v, key_padding(valid, "flex"))
    torch.testing.assert_close(attend(q, k_bad, v_bad, key_padding(valid, "flex")), out, rtol=1e-5, atol=1e-5)


def test_split_attention_and_its_gradients_match_a_float64_softmax():
    """Text keys [0, T) masked, image keys [T, S) not: two parts merged by log-sum-exp,
    the backward given the merged output. Row 1 has no valid text key at all."""
    gen = torch.Generator().manual_seed(1)
    B, H, G, T, L, K = 3, 4, 2, 24, 40, 16
    S = T + L
    q, k, v = (torch.randn(B, n, S, K, generator=gen, requires_grad=True) for n in (H, G, G))
    valid_text = torch.ones(B, T, dtype=torch.bool)
    valid_text[0, 10:] = False
    valid_text[1] = False
    valid_text[2, ::3] = False
    valid = torch.cat((valid_text, torch.ones(B, L, dtype=torch.bool)), dim=1)
    grad_out = torch.randn(B, H, S, K, generator=gen)
    ref = reference_attention(q, k, v, valid)
    ref_grads = torch.autograd.grad((ref * grad_out.double()).sum(), (q, k, v))
    out = attend(q, k, v, split_key_padding(valid_text))
    grads = torch.autograd.grad((out * grad_out).sum(), (q, k, v))
    assert ((out.double() - ref).norm() / ref.norm()).item() < 1e-5
    for name, g, r in zip("qkv", grads, ref_grads):
        assert ((g.double() - r).norm() / r.norm()).item() < 1e-5, name
    # Padded text keys get no gradient, and their contents do not reach the output.
    assert grads[1][:, :, :T].masked_select(~valid_text[:, None, :, None]).abs().max() == 0


def test_varlen_segments_attend_like_the_key_mask_on_valid_rows():
    gen = torch.Generator().manual_seed(4)
    B, H, G, L, T, K = 3, 4, 2, 40, 12, 16
    counts = [12, 5, 0]  # full text, padded, no text at all
    valid_BT = torch.arange(T)[None, :] < torch.tensor(counts)[:, None]
    seg = varlen_segments(valid_BT, L)
    assert seg.cu_seqlens.tolist() == [0, 52, 52, 97, 104, 144, 156] and seg.max_len == L + T
    q, k, v = (torch.randn(B, n, L + T, K, generator=gen) for n in (H, G, G))
    valid_BS = torch.cat((torch.ones(B, L, dtype=torch.bool), valid_BT), dim=1)
    ref = reference_attention(q, k, v, valid_BS)
    out = attend(q, k, v, seg).double()
    rows = valid_BS[:, None, :, None]
    assert ((out - ref) * rows).norm() / (ref * rows).norm() < 1e-5
    assert torch.isfinite(out).all()
    # valid_first: valid tokens to the front, in order, whatever the mask's holes.
    text = torch.arange(2 * 5).view(2, 5, 1).float()
    mask = torch.tensor([[0, 1, 0, 1, 1], [1, 0, 0, 0, 1]], dtype=torch.bool)
    moved, moved_mask = valid_first(text, mask)
    assert moved[..., 0].tolist() == [[1, 3, 4, 0, 2], [5, 9, 6, 7, 8]]
    assert moved_mask.tolist() == [[True] * 3 + [False] * 2, [True] * 2 + [False] * 3]


def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            std = 0.2 if p.ndim == 1 or p.shape[-1] <= 16 else p.shape[-1] ** -0.5
            p.copy_(torch.randn(p.shape, generator=gen) * std)
    return model


def model_inputs(cfg, B=2, T=9, h=4, w=4, seed=1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(B, h * w, cfg.in_channels, generator=gen)
    text = torch.randn(B, T, cfg.num_text_layers, cfg.text_dim, generator=gen)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[0, 5:] = False
    mask[1, 2:] = False
    return x, text, torch.tensor([0.3, 0.7]), positions(T, h, w), mask


@torch.no_grad()
def test_model_under_flex_varlen_and_split_attention_matches_dense_masked_sdpa():
    cfg = tiny_cfg()
    model = randomize_(K2DiT(cfg)).eval()
    x, text, t, pos, mask = model_inputs(cfg)
    model.attention = "sdpa"
    ref = model(x, text, t, pos, mask)
    assert ref.abs().mean() > 0.1
    for backend in ("flex", "varlen", "split"):  # varlen: rows reordered [image | valid text | padding]
        model.attention = backend
        out = model(x, text, t, pos, mask)
        assert ((out - ref).norm() / ref.norm()).item() < 1e-5, backend
    holes = mask.clone()
    holes[0, 1] = False  # a hole inside a prompt: valid_first still puts it in the padding segment
    model.attention = "sdpa"
    ref = model(x, text, t, pos, holes)
    model.attention = "varlen"
    assert ((model(x, text, t, pos, holes) - ref).norm() / ref.norm()).item() < 1e-5
    _, hidden = model(x, text, t, pos, holes, return_hidden_block=0)
    model.attention = "sdpa"
    torch.testing.assert_close(hidden, model(x, text, t, pos, holes, return_hidden_block=0)[1], rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_trimmed_padding_gives_the_padded_velocity():
    cfg = tiny_cfg()
    model = randomize_(K2DiT(cfg), seed=3).eval()
    x, text, t, pos, mask = model_inputs(cfg)
    ref = model(x, text, t, pos, mask)
    short, short_mask = trim_padding(text, mask)
    assert short.shape[1] == 5 and short_mask is not None  # the longest prompt has 5 tokens
    out = model(x, short, t, positions(5, 4, 4), short_mask)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    # One prompt, padded: nothing is left to mask.
    one, one_mask = trim_padding(text[:1], mask[:1])
    assert one.shape[1] == 5 and one_mask is None
    torch.testing.assert_close(model(x[:1], one, t[:1], positions(5, 4, 4), None), ref[:1], rtol=1e-5, atol=1e-6)
    # A hole inside the prompt keeps its column and the mask.
    holes = mask.clone()
    holes[0, 1] = False
    _, holes_mask = trim_padding(text, holes)
    assert holes_mask.tolist() == holes[:, :5].tolist()


def test_fused_projections_give_the_unfused_velocity_in_float64():
    cfg = tiny_cfg()
    model = randomize_(K2DiT(cfg), seed=4).double().eval()
    x, text, t, pos, mask = (a.double() if a.is_floating_point() else a for a in model_inputs(cfg))
    with torch.no_grad():
        ref = model(x, text, t, pos, mask)
        unfused = sum(p.numel() for p in model.parameters())
        blocks = cfg.num_blocks + cfg.num_layerwise_blocks + cfg.num_refiner_blocks
        assert fuse_projections(model) == 2 * blocks  # an attention and a SwiGLU per block
        assert fuse_projections(model) == 0  # once
        names = set(dict(model.named_parameters()))
        assert "blocks.0.attn.qkvg.weight" in names and "blocks.0.attn.q.weight" not in names
        assert "blocks.0.mlp.w_gate_up.weight" in names and "blocks.0.mlp.w_up.weight" not in names
        assert sum(p.numel() for p in model.parameters()) == unfused
        torch.testing.assert_close(model(x, text, t, pos, mask), ref, rtol=1e-12, atol=1e-12)
        assert unfuse_projections(model) == 2 * blocks
        assert sorted(model.state_dict()) == sorted(K2DiT(cfg).state_dict())  # the release names again
        torch.testing.assert_close(model(x, text, t, pos, mask), ref, rtol=0, atol=0)


def test_concatenated_weights_give_the_separate_loss_and_gradients_in_float64():
    from trainer.model.layers import Attention, SwiGLU

    cfg = tiny_cfg()
    model = randomize_(K2DiT(cfg), seed=6).double()
    x, text, t, pos, mask = (a.double() if a.is_floating_point() else a for a in model_inputs(cfg))

    def loss_and_grads():
        model.zero_grad()
        loss = model(x, text, t, pos, mask).square().mean()
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    ref_loss, ref_grads = loss_and_grads()
    modules = [m for m in model.modules() if isinstance(m, (Attention, SwiGLU))]
    for m in modules:
        m.concat_weights = True
    loss, grads = loss_and_grads()
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=0)
    assert grads.keys() == ref_grads.keys() and "blocks.0.attn.q.weight" in grads
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-10, atol=1e-14, msg=name)


@torch.no_grad()
def test_reused_text_path_runs_once_per_prompt_batch_and_gives_the_same_velocity():
    cfg = tiny_cfg()
    model = randomize_(K2DiT(cfg), seed=7).eval()
    x, text, t, pos, mask = model_inputs(cfg)
    steps = [(x * (i + 1), t / (i + 1)) for i in range(3)]  # sampling steps: new x and t, the same prompts
    plain = [model(xi, text, ti, pos, mask) for xi, ti in steps]
    ref = [model(x, text * 2, t, pos, mask), model(x, text, t, pos, mask[[1, 0]]), model(x, text, t, pos, mask)]
    runs = []
    model.text_fusion.layerwise[0].register_forward_hook(lambda *_: runs.append(1))
    model.text_fusion.reuse_output = True
    for (xi, ti), expected in zip(steps, plain):
        torch.testing.assert_close(model(xi, text.clone(), ti, pos, mask), expected, rtol=0, atol=0)
    assert len(runs) == 1
    # Another prompt batch (other values, another mask) runs the text path again.
    torch.testing.assert_close(model(x, text * 2, t, pos, mask), ref[0], rtol=0, atol=0)
    torch.testing.assert_close(model(x, text, t, pos, mask[[1, 0]]), ref[1], rtol=0, atol=0)
    torch.testing.assert_close(model(x, text, t, pos, mask), ref[2], rtol=0, atol=0)
    assert len(runs) == 4
    with torch.enable_grad():  # with gradients it never reuses
        model(x, text, t, pos, mask)
    assert len(runs) == 5


def test_fusing_leaves_lora_adapted_projections_alone():
    from peft import LoraConfig, inject_adapter_in_model

    cfg = tiny_cfg()
    model = inject_adapter_in_model(LoraConfig(r=2, target_modules=["q", "w_up"]), randomize_(K2DiT(cfg), seed=5))
    assert fuse_projections(model) == 0
    assert all(hasattr(b.attn, "q") and hasattr(b.mlp, "w_up") for b in model.blocks)


def _params(seed=0, n=3):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(4, 5, generator=gen)) for _ in range(n)]


def test_ema_with_a_device_flag_equals_the_plain_update_or_stays():
    model = torch.nn.ParameterList(_params())
    plain, flagged = EMA(model, 0.9), EMA(model, 0.9)
    with torch.no_grad():
        for p in model:
            p.add_(1.0)
    before = [s.clone() for s in flagged.shadow]
    flagged.update(torch.tensor(False))
    assert all(torch.equal(a, b) for a, b in zip(flagged.shadow, before))
    plain.update()
    flagged.update(torch.tensor(True))
    for a, b, s0 in zip(flagged.shadow, plain.shadow, before):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(a, s0 + 0.1 * 1.0, rtol=1e-6, atol=1e-6)  # moved a tenth of the way


def _fused_adamw(params):
    cfg = OptimizerConfig(lr=1e-2, weight_decay=0.1)
    groups = [{"params": params, "weight_decay": cfg.weight_decay}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, fused=True)


def test_fused_adamw_skip_on_device_leaves_everything_and_otherwise_matches_foreach():
    fused_p, foreach_p = _params(1), _params(1)
    fused = _fused_adamw(fused_p)
    foreach = build_optimizer(torch.nn.ParameterList(foreach_p), OptimizerConfig(lr=1e-2, weight_decay=0.1))
    assert skips_on_device(fused) and not skips_on_device(foreach)  # CPU parameters: the trainer keeps foreach
    for step in range(3):
        gen = torch.Generator().manual_seed(10 + step)
        for a, b in zip(fused_p, foreach_p):
            a.grad = torch.randn(a.shape, generator=gen)
            b.grad = a.grad.clone()
        step_unless(fused, torch.tensor(False))
        foreach.step()
    for a, b in zip(fused_p, foreach_p):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    kept = [p.detach().clone() for p in fused_p]
    moments = [fused.state[p]["exp_avg"].clone() for p in fused_p]
    for p in fused_p:
        p.grad = torch.full_like(p, float("nan"))
    step_unless(fused, torch.tensor(True))
    assert all(torch.equal(p, k) for p, k in zip(fused_p, kept))
    assert all(torch.equal(fused.state[p]["exp_avg"], m) for p, m in zip(fused_p, moments))
    assert all(fused.state[p]["step"].item() == 3 for p in fused_p)


def test_update_with_a_fused_optimizer_skips_a_nan_step_without_reading_it():
    model = torch.nn.ParameterList(_params(2))
    t = Trainable(model, _fused_adamw(list(model)), EMA(model, 0.5), {})
    for p in model:
        p.grad = torch.ones_like(p)
    grad_norm, applied = update(t, 1.0, 0)
    assert torch.is_tensor(applied) and bool(applied)
    kept = [p.detach().clone() for p in model]
    shadow = [s.clone() for s in t.ema.shadow]
    model[0].grad = torch.full_like(model[0], float("inf"))
    model[1].grad = torch.ones_like(model[1])
    grad_norm, applied = update(t, 1.0, 1)
    assert not bool(applied) and not torch.isfinite(grad_norm)
    assert all(torch.equal(p, k) for p, k in zip(model, kept))
    assert all(torch.equal(s, k) for s, k in zip(t.ema.shadow, shadow))


@pytest.mark.parametrize("flags", [[0, 1, 1, 0, 1, 1, 1, 0, 0], [1, 1, 0, 0, 0, 1]])
def test_skipped_steps_on_device_count_what_host_flags_count(flags):
    host, device = SkippedSteps(), SkippedSteps()
    runs = []
    for f in flags:
        host.add(bool(f))
        device.add(torch.tensor(bool(f)))
        runs.append(host.known())
    assert device.known() == 0 and device.on_device
    run, longest = device.read()
    assert run == runs[-1] and longest == max(runs)
    device.add(torch.tensor(True))
    assert device.read() == (run + 1, run + 1)  # the longest since the last read


def test_fused_skip_and_ema_under_fsdp2_dtensor_parameters():
    """FSDP2 parameters are DTensors: the 0-dim found-inf flag and the EMA weight are plain
    tensors beside them (one-process gloo mesh)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 4))
        fully_shard(model, mesh=init_device_mesh("cpu", (1,)))
        t = Trainable(model, _fused_adamw(list(model.parameters())), EMA(model, 0.5), {})
        model(torch.randn(3, 8)).sum().backward()
        _, applied = update(t, 1.0, 0)
        assert bool(applied)
        kept = [p.detach().to_local().clone() for p in model.parameters()]
        shadow = [s.to_local().clone() for s in t.ema.shadow]
        for p in model.parameters():
            p.grad = torch.full_like(p, float("nan"))
        _, applied = update(t, 1.0, 1)
        assert not bool(applied)
        assert all(torch.equal(p.detach().to_local(), k) for p, k in zip(model.parameters(), kept))
        assert all(torch.equal(s.to_local(), k) for s, k in zip(t.ema.shadow, shadow))
    finally:
        dist.destroy_process_group()


class DeviceSkipStage(FlowStage):
    """The CUDA optimizer path on CPU: a fused AdamW, so `update` decides skips on the
    device and the loop only reads them at log and checkpoint steps. Losses are NaN at
    steps 4-6 (1-based), finite before and after."""

    def __init__(self, cfg, d, data, resume_dir):
        super().__init__(cfg, d, data, resume_dir)
        t = self.trainables["model"]
        t.optimizer = _fused_adamw([p for g in t.optimizer.param_groups for p in g["params"]])
        real = self.objective.loss

        def loss(model, batch):
            value, terms = real(model, batch)
            return (value * float("nan") if 3 <= self.objective.step <= 5 else value), terms

        self.objective.loss = loss


def test_a_run_of_device_skips_between_two_reads_fails_the_run(run_root):
    proc = subprocess.run(train_cmd("experiment=test_tiny", f"run_root={run_root}", "name=devskip",
                                    "stage.kind=tests.trainer.test_fast_paths:DeviceSkipStage",
                                    "stage.max_nonfinite_steps=3", "log.every=8", "checkpoint.every=8"),
                          cwd=ROOT, env=train_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-2000:]
    # Read at step 8, two finite steps after the run ended: the longest run still counts.
    assert "steps 1-8: up to 3 steps in a row had a non-finite gradient norm and were skipped" in proc.stderr
    assert "step 8: 3 steps in a row within steps 1-8 had a non-finite gradient norm" in proc.stderr
    assert list_checkpoints(os.path.join(run_root, "devskip", "checkpoints")) == []  # stopped before saving
