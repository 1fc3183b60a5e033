"""`python -m trainer.sample`: safety before anything is written, and images that are `generate`'s.

The source is built without training: a seeded random tiny K2DiT saved as a diffusers
folder, the tiny Qwen3-VL text encoder, and pixel latents (--vae pixels).
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from data.latents import make_latents
from data.shapes_loader import ensure_tiny_encoder
from data.text import TextEncoder
from tests.conftest import ROOT, run_training, train_env
from trainer.config import TrainConfig
from trainer.evaluate import load_run_config
from trainer.model import K2DiT, ModelConfig, save_pretrained
from trainer.safety import Blocklist, NoImageClassifier, build_checker
from trainer.lora_io import parse_lora
from trainer.sample import generate
from trainer.weights import load_weights

TEXT_LEN = 24
PROMPT = "a red circle above a blue square"
# A module the sampler imports by --safety: refuses every image, allows every prompt.
REFUSE_ALL = '''
from trainer.safety import Verdict

class RefuseAll:
    def check_prompt(self, prompt):
        return Verdict(True, "")

    def check_images(self, images, prompts):
        assert images.dtype.name == "uint8" and images.shape[-1] == 3
        return [Verdict(False, f"test classifier refuses {len(images)} of {len(images)}")] * len(images)
'''


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    root = tmp_path_factory.mktemp("sample_cli")
    cfg = ModelConfig(**OmegaConf.to_container(OmegaConf.load(os.path.join(ROOT, "configs/model/tiny.yaml"))))
    cfg.patch_size = 2  # diffusers folders store packed channels, read back with Krea 2's patch 2
    torch.manual_seed(0)
    model = K2DiT(cfg)
    for p in model.parameters():  # random everywhere (zero-initialised outputs would make grey images)
        torch.nn.init.normal_(p, std=0.05)
    save_pretrained(model, root / "transformer")
    ensure_tiny_encoder(root / "text_encoder", [PROMPT, "a classic red circle", "a green triangle"])
    (root / "refuse_all.py").write_text(REFUSE_ALL)
    return root


def sample_cli(source, out, *args):
    env = train_env()
    env["PYTHONPATH"] = f"{ROOT}{os.pathsep}{source}"  # source holds refuse_all.py
    cmd = [sys.executable, "-m", "trainer.sample", str(source / "transformer"),
           "--encoder", str(source / "text_encoder"), "--vae", "pixels", "--text-len", str(TEXT_LEN),
           "--size", "32", "--steps", "3", "--guidance", "2.5", "--device", "cpu",
           "--out", str(out), *args]  # fmt: skip
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def pngs(folder):
    return sorted(f for f in os.listdir(folder) if f.endswith(".png"))


def test_blocked_prompt_exits_3_and_writes_nothing(source, tmp_path):
    out = tmp_path / "out"
    proc = sample_cli(source, out, "--prompt", "a red circle", "--prompt", "a nude figure on a beach")
    assert proc.returncode == 3, proc.stderr
    assert 'refused: prompt 2 ("a nude figure on a beach"): blocked term "nude"' in proc.stderr
    assert "prompt 1" not in proc.stderr
    assert not out.exists()


def test_blocklist_file_adds_whole_word_terms(source, tmp_path):
    blocklist = tmp_path / "terms.txt"
    blocklist.write_text("# deployment terms\nass\n\nBlue Square\n")
    out = tmp_path / "out"
    proc = sample_cli(source, out, "--blocklist", str(blocklist), "--prompt", "a classic red circle",
                      "--prompt", "a green ASS.", "--prompts-file", str(_lines(tmp_path, [PROMPT])))
    assert proc.returncode == 3
    assert "prompt 1" not in proc.stderr  # "class" is not "ass"
    assert 'refused: prompt 2 ("a green ASS."): blocked term "ass"' in proc.stderr
    assert f'refused: prompt 3 ("{PROMPT}"): blocked term "blue square"' in proc.stderr
    assert not out.exists()


def test_blocklist_matches_whole_words_only():
    b = Blocklist(["ass", "red  circle"])
    allowed = ["a classic blue circle", "a glass bass", "passing", "a redcircle", "a red  circles"]
    assert all(b.check_prompt(p).allowed for p in allowed)
    for prompt in ["ass", "an ASS!", "a (ass)", "kick-ass", "a red\tcircle", "A Red Circle"]:
        assert not b.check_prompt(prompt).allowed, prompt
    assert b.check_prompt("a big ass").reason == 'blocked term "ass"'
    assert b.check_prompt("A  RED\ncircle").reason == 'blocked term "red circle"'
    # The default list is always in the chain, and the default image check passes everything, saying so.
    chain = build_checker()
    assert not chain.check_prompt("something nsfw").allowed and chain.check_prompt("a classic red circle").allowed
    verdicts = NoImageClassifier().check_images(np.zeros((2, 4, 4, 3), np.uint8), ["a", "b"])
    assert [v.allowed for v in verdicts] == [True, True] and "no image classifier" in verdicts[0].reason


def test_allowed_prompt_writes_images_equal_to_generate(source, tmp_path):
    out = tmp_path / "out"
    proc = sample_cli(source, out, "--prompt", PROMPT, "--num-per-prompt", "3", "--seed", "11")
    assert proc.returncode == 0, proc.stderr
    assert "sampling 1/1" in proc.stdout
    files = [f"{i:04d}_{11 + i}_a-red-circle-above-a-blue-square.png" for i in range(3)]
    assert pngs(out) == sorted(files + ["grid.png"])
    report = json.loads((out / "samples.json").read_text())
    assert [(r["prompt"], r["seed"], r["file"], r["refused"]) for r in report["images"]] == [
        (PROMPT, 11 + i, files[i], False) for i in range(3)]
    assert report["settings"]["steps"] == 3 and report["settings"]["guidance"] == 2.5
    assert report["settings"]["text"]["layers"] == [1, 2, 3, 4] and report["refused"] == 0
    assert report["source"] == str(source / "transformer") and report["loras"] == []

    model = load_weights(str(source / "transformer"))
    encoder = TextEncoder.from_pretrained(source / "text_encoder", layers=[1, 2, 3, 4], max_len=TEXT_LEN)
    images = generate(model, encoder.encode, make_latents("pixels").decode, [PROMPT] * 3, [11, 12, 13], model.cfg,
                      (32, 32), 3, 2.5, torch.device("cpu"))  # fmt: skip
    expected = ((images + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    written = np.stack([np.asarray(Image.open(out / f)) for f in files])
    assert written.dtype == np.uint8 and written.shape == (3, 32, 32, 3)
    assert np.array_equal(written, expected)
    assert not np.array_equal(written[0], written[1])  # seeds matter: not a constant image
    grid = np.asarray(Image.open(out / "grid.png"))
    assert grid.shape == (32 + 28, 3 * 32, 3)
    assert np.array_equal(grid[:32, 32:64], expected[1])  # second tile is the second image, unscaled


def test_refused_images_are_not_written(source, tmp_path):
    out = tmp_path / "out"
    proc = sample_cli(source, out, "--prompt", PROMPT, "--prompt", "a green triangle", "--batch-size", "1",
                      "--safety", "refuse_all:RefuseAll")
    assert proc.returncode == 3, proc.stderr
    assert "sampling 1/2" in proc.stdout and "sampling 2/2" in proc.stdout
    assert 'refused: image 1 (prompt "a green triangle", seed 1): test classifier refuses 1 of 1' in proc.stderr
    assert pngs(out) == []
    report = json.loads((out / "samples.json").read_text())
    assert report["refused"] == 2 and report["grid"] is None
    assert [(r["prompt"], r["file"], r["refused"]) for r in report["images"]] == [
        (PROMPT, None, True), ("a green triangle", None, True)]
    assert report["safety"].startswith("Blocklist(") and "RefuseAll" in report["safety"]


def test_bad_safety_spec_fails_before_writing(source, tmp_path):
    out = tmp_path / "out"
    proc = sample_cli(source, out, "--prompt", PROMPT, "--safety", "refuse_all.RefuseAll")
    assert proc.returncode == 1 and "expected package.module:Class" in proc.stderr
    assert not out.exists()


def test_released_weights_need_encoder_and_vae(source, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "trainer.sample", str(source / "transformer"), "--prompt", PROMPT,
                           "--out", str(tmp_path / "out")], cwd=ROOT, env=train_env(), capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 1
    assert "pass --encoder PATH" in proc.stderr and "--vae PATH" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_parse_lora():
    assert parse_lora("pink.safetensors:0.8", 1.0) == ("pink.safetensors", 0.8)
    assert parse_lora("pink.safetensors", 0.5) == ("pink.safetensors", 0.5)
    assert parse_lora("dir:with:colons/x.safetensors", 0.5) == ("dir:with:colons/x.safetensors", 0.5)


def _lines(folder, lines):
    path = folder / "prompts.txt"
    path.write_text("\n".join(lines) + "\n\n")
    return path


def test_run_step_dir_takes_its_encoder_decoder_and_defaults(tmp_path):
    run_training("experiment=test_tiny", f"run_root={tmp_path}", "name=r", "stage.steps=1", "log.sample_steps=3",
                 "log.sample_guidance=1.5")  # fmt: skip
    step_dir = tmp_path / "r" / "checkpoints" / "step_00000001"
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "trainer.sample", str(step_dir), "--prompt", "a red circle",
                           "--weights", "model", "--mu", "1.0", "--seed", "5", "--device", "cpu", "--out", str(out)],
                          cwd=ROOT, env=train_env(), capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    report = json.loads((out / "samples.json").read_text())
    assert (report["settings"]["steps"], report["settings"]["guidance"], report["settings"]["size"]) == (3, 1.5, 32)

    cfg = load_run_config(str(tmp_path / "r"))
    encoder = TextEncoder.from_pretrained(tmp_path / "r" / "assets" / "text_encoder", layers=cfg.data.text_layers,
                                          max_len=cfg.data.text_len)  # fmt: skip
    model = load_weights(str(step_dir), "model")
    decode = make_latents("pixels", pixel_downsample=cfg.data.pixel_downsample).decode
    side = 32 // cfg.data.pixel_downsample

    def expected(mu):
        images = generate(model, encoder.encode, decode, ["a red circle"], [5], cfg.model, (side, side), 3, 1.5,
                          torch.device("cpu"), mu=mu)  # fmt: skip
        return ((images + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)[0].permute(1, 2, 0).numpy()

    written = np.asarray(Image.open(out / "0000_5_a-red-circle.png"))
    assert np.array_equal(written, expected(1.0))
    assert not np.array_equal(written, expected(None))  # --mu reached the sampler


def _sample_in_process(argv):
    from trainer.sample import parse_args, sample

    with torch.no_grad():
        return sample(parse_args(argv))


def test_turbo_samples_a_tdm_run_at_its_segments_and_mu(source, tmp_path, monkeypatch):
    # A TDM run's config (stage.kind=tdm) beside a checkpoint folder; its weights: the source's.
    run = tmp_path / "tdm"
    cfg = OmegaConf.structured(TrainConfig)
    cfg.model = OmegaConf.merge(cfg.model, OmegaConf.load(os.path.join(ROOT, "configs/model/tiny.yaml")))
    cfg.model.patch_size = 2
    cfg.data.encoder_path = str(source / "text_encoder")
    cfg.data.text_len = TEXT_LEN
    cfg.stage.kind, cfg.stage.tdm.segments, cfg.stage.tdm.mu = "tdm", 3, 0.7
    os.makedirs(run / "checkpoints" / "step_00000001")
    OmegaConf.save(cfg, run / "config.yaml")
    model = load_weights(str(source / "transformer"))
    monkeypatch.setattr("trainer.weights.load_weights", lambda src, which="ema", loras=(): model)
    encoder = TextEncoder.from_pretrained(source / "text_encoder", layers=[1, 2, 3, 4], max_len=TEXT_LEN)

    def expected(steps, mu):
        images = generate(model, encoder.encode, make_latents("pixels").decode, [PROMPT], [4], model.cfg, (32, 32),
                          steps, 0.0, torch.device("cpu"), mu=mu)  # fmt: skip
        return ((images + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)[0].permute(1, 2, 0).numpy()

    png = f"0000_4_{PROMPT.replace(' ', '-')}.png"
    for flags, (steps, mu) in [([], (3, 0.7)), (["--steps", "2", "--mu", "0.3"], (2, 0.3))]:
        out = tmp_path / f"out{steps}"
        assert _sample_in_process([str(run), "--turbo", *flags, "--prompt", PROMPT, "--seed", "4", "--device", "cpu",
                                   "--out", str(out)]) == 0
        settings = json.loads((out / "samples.json").read_text())["settings"]
        assert (settings["steps"], settings["guidance"], settings["mu"], settings["turbo"]) == (steps, 0.0, mu, True)
        assert np.array_equal(np.asarray(Image.open(out / png)), expected(steps, mu))
    assert not np.array_equal(expected(3, 0.7), expected(3, None))  # the pinned mu matters


def test_turbo_on_released_weights_is_krea_2_turbos_sampler(source, tmp_path):
    out = tmp_path / "out"
    assert _sample_in_process([str(source / "transformer"), "--encoder", str(source / "text_encoder"), "--vae",
                               "pixels", "--text-len", str(TEXT_LEN), "--size", "32", "--device", "cpu", "--turbo",
                               "--guidance", "1.5", "--prompt", PROMPT, "--out", str(out)]) == 0
    settings = json.loads((out / "samples.json").read_text())["settings"]
    assert (settings["steps"], settings["guidance"], settings["mu"], settings["mu_pinned"]) == (8, 1.5, 1.15, True)
    model = load_weights(str(source / "transformer"))
    encoder = TextEncoder.from_pretrained(source / "text_encoder", layers=[1, 2, 3, 4], max_len=TEXT_LEN)
    images = generate(model, encoder.encode, make_latents("pixels").decode, [PROMPT], [0], model.cfg, (32, 32), 8,
                      1.5, torch.device("cpu"), mu=1.15)  # fmt: skip
    expected = ((images + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)[0].permute(1, 2, 0).numpy()
    assert np.array_equal(np.asarray(Image.open(out / f"0000_0_{PROMPT.replace(' ', '-')}.png")), expected)
