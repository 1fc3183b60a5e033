"""trainer.evaluate: the all-correct score on drawn images, prompt sets, and which baseline a run is compared with."""

import json
import os
import sys
import types

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from data.shapes import BACKGROUNDS, PRETRAIN_COLOURS, Scene, ShapesWorld, parse_caption, scene_to_caption
from trainer import evaluate as ev
from trainer.config import TrainConfig
from trainer.flow import shift_mu
from trainer.lora_io import parse_lora

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PINK = "a pink circle above a green square"


def _pixels(image_HWC: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(image_HWC).permute(2, 0, 1).float() / 127.5 - 1.0


def _draw(caption: str, seed: int = 0) -> torch.Tensor:
    return _pixels(ShapesWorld(image_size=32).render(caption, np.random.default_rng(seed)))


def test_score_on_drawn_images():
    right = _draw(PINK)
    wrong_colour = _draw("a red circle above a green square")
    wrong_relation = _draw("a pink circle below a green square")
    wrong_shape = _draw("a pink square above a green square")
    assert ev.score(right[None], [PINK]) == {"colours": 1.0, "shapes": 1.0, "relation": 1.0, "all_correct": 1.0}
    assert ev.score(wrong_colour[None], [PINK]) == {"colours": 0.0, "shapes": 0.0, "relation": 0.0,
                                                    "all_correct": 0.0}
    assert ev.score(wrong_relation[None], [PINK]) == {"colours": 1.0, "shapes": 1.0, "relation": 0.0,
                                                      "all_correct": 0.0}
    batch = torch.stack([right, wrong_colour, wrong_relation, wrong_shape])
    assert ev.score(batch, [PINK] * 4) == {"colours": 0.75, "shapes": 0.5, "relation": 0.5, "all_correct": 0.25}
    blank = torch.full((3, 32, 32), BACKGROUNDS["light"][0] / 127.5 - 1.0)
    assert ev.score(blank[None], ["a red circle"])["all_correct"] == 0.0


def test_prompt_sets_and_lora_specs():
    world = ShapesWorld()
    assert ev.prompt_sets(["held-out", "training"], world) == {"held-out": world.held_out_prompts(),
                                                               "training": world.train_prompts_example()}
    sets = ev.prompt_sets(["concept"], world)
    assert list(sets) == ["concept", "concept-ref"] and sets["concept"][0] == PINK
    assert sets["concept-ref"][0] == "a red circle above a green square"
    with pytest.raises(ValueError, match="pink"):
        ev.prompt_sets(["pink"], world)
    assert parse_lora("runs/pink_lora:0.5") == ("runs/pink_lora", 0.5)
    assert parse_lora("runs/pink_lora") == ("runs/pink_lora", 1.0)
    assert parse_lora("odd:name") == ("odd:name", 1.0)


# ---- evaluate() with stand-in models ---------------------------------------------------------
# trainer/weights.py's load_weights is replaced by a stub that records what it was asked
# for and returns models whose "generations" are renders of what they would draw: the
# scores are then known exactly.
class _Drawer:
    """Draws every prompt exactly, except pink, which it does not know unless told."""

    def __init__(self, knows_pink: bool):
        self.knows_pink = knows_pink

    def draws(self, prompt: str) -> str:
        scene = parse_caption(prompt)
        if self.knows_pink or "pink" not in prompt.split():
            return prompt
        spare = next(c for c in PRETRAIN_COLOURS if c not in {c for c, _ in scene.objects})
        return scene_to_caption(Scene(tuple((spare if c == "pink" else c, s) for c, s in scene.objects),
                                      scene.relation))


def _fake_generate(model, encode, decode, prompts, seeds, model_cfg, latent_hw, steps, guidance, device,
                   mu=None):
    if not isinstance(model, _Drawer):  # the untrained K2DiT: an empty canvas
        return torch.full((len(prompts), 3, 32, 32), BACKGROUNDS["dark"][0] / 127.5 - 1.0)
    return torch.stack([_draw(model.draws(p), s) for p, s in zip(prompts, seeds)])


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory):
    from data.shapes_loader import ensure_tiny_encoder

    return ensure_tiny_encoder(tmp_path_factory.mktemp("enc") / "text_encoder", ShapesWorld().all_captions())


def _run_dir(path, encoder_dir, init_from=None, step=7) -> str:
    cfg = OmegaConf.structured(TrainConfig)
    cfg.model = OmegaConf.merge(cfg.model, OmegaConf.load(os.path.join(ROOT, "configs/model/tiny.yaml")))
    cfg.data.encoder_path = encoder_dir
    cfg.checkpoint.init_from = init_from
    os.makedirs(path / "checkpoints" / f"step_{step:08d}")
    OmegaConf.save(cfg, path / "config.yaml")
    return str(path)


@pytest.fixture
def stub_weights(monkeypatch):
    calls = []

    def load_weights(source, which="ema", loras=(), model_cfg=None):
        assert model_cfg is not None and model_cfg.name == "tiny"  # the run's network, checked on load
        calls.append((source, which, tuple(tuple(x) for x in loras)))
        return _Drawer(knows_pink=source.endswith("sft") or bool(loras))

    monkeypatch.setitem(sys.modules, "trainer.weights", types.SimpleNamespace(load_weights=load_weights))
    monkeypatch.setattr(ev, "generate", _fake_generate)
    return calls


ALL = {"colours": 1.0, "shapes": 1.0, "relation": 1.0, "all_correct": 1.0}
NONE = {"colours": 0.0, "shapes": 0.0, "relation": 0.0, "all_correct": 0.0}


def test_sft_run_is_compared_with_its_init_model(tmp_path, encoder_dir, stub_weights, capsys):
    base = str(tmp_path / "base")
    run = _run_dir(tmp_path / "sft", encoder_dir, init_from=base)
    report = ev.evaluate(run, seeds=2, steps=1, prompts=["concept", "held-out"])
    assert stub_weights == [(base, "ema", ()), (run, "ema", ())]  # the init model, then the run
    assert report["baseline"] == "base" and report["baseline_source"] == base and report["step"] == 7
    # The base draws another colour for pink: it knows the layouts (concept-ref) but not the word.
    assert report["base"] == {"concept": NONE, "concept-ref": ALL, "held-out": ALL}
    assert report["trained"] == {"concept": ALL, "concept-ref": ALL, "held-out": ALL}
    assert report["prompts"]["concept"][1] == "a blue triangle below a pink circle"
    with open(os.path.join(run, "eval.json")) as f:
        assert json.load(f) == report
    # eval.png: per set a strip of baseline images and one of the scored model's, 8 cells of 128 px
    # (+ 28 for the caption) under a 16 px label
    assert Image.open(os.path.join(run, "eval.png")).size == (8 * 128, 3 * 2 * (16 + 128 + 28))
    out = capsys.readouterr().out
    assert "all correct" in out
    rows = {tuple(line.split()[:2]): line.split()[2:] for line in out.splitlines() if line.startswith("concept")}
    assert rows[("concept", "base")] == ["0%", "0%", "0%", "0%"]
    assert rows[("concept", "step")] == ["7", "100%", "100%", "100%", "100%"]


def test_lora_is_scored_against_the_same_weights_without_it(tmp_path, encoder_dir, stub_weights):
    run = _run_dir(tmp_path / "demo", encoder_dir)
    ev.main([run, "--seeds", "1", "--steps", "1", "--prompts", "concept", "--lora", "runs/pink_lora:0.5",
             "--lora", "runs/other"])
    assert stub_weights == [(run, "ema", ()), (run, "ema", (("runs/pink_lora", 0.5), ("runs/other", 1.0)))]
    with open(os.path.join(run, "eval.json")) as f:
        report = json.load(f)
    assert report["loras"] == [["runs/pink_lora", 0.5], ["runs/other", 1.0]] and report["baseline"] == "base"
    assert report["base"]["concept"]["all_correct"] == 0.0 and report["trained"]["concept"]["all_correct"] == 1.0


def test_pretraining_run_is_compared_with_the_untrained_model(tmp_path, encoder_dir, stub_weights):
    run = _run_dir(tmp_path / "demo", encoder_dir, step=12)
    report = ev.evaluate(run, seeds=1, steps=1, live=True)
    assert stub_weights == [(run, "model", ())]  # the untrained model is built, not loaded
    assert report["baseline"] == "untrained" and report["weights"] == "model" and report["step"] == 12
    assert set(report["trained"]) == {"held-out", "training", "one-shape"}  # today's default sets
    assert report["untrained"] == {"held-out": NONE, "training": {**NONE, "relation": 0.375},  # 3 one-shape prompts
                                   "one-shape": {**NONE, "relation": 1.0}}  # no relation to get wrong
    assert report["trained"] == {"held-out": ALL, "training": ALL, "one-shape": ALL}


def test_stages_are_scored_on_the_same_prompts_into_one_table(tmp_path, encoder_dir, stub_weights):
    base = _run_dir(tmp_path / "base", encoder_dir, step=30)
    sft = _run_dir(tmp_path / "sft", encoder_dir, init_from=base, step=8)
    out = str(tmp_path / "stages")
    ev.main([base, sft, "--out", out, "--seeds", "2", "--steps", "1", "--prompts", "concept",
             "--reward", "rubric"])
    assert stub_weights == [(base, "ema", ()), (sft, "ema", ())]
    with open(os.path.join(out, "stages.json")) as f:
        report = json.load(f)
    first, second = (report["stages"][r]["scores"] for r in (base, sft))
    # The base draws another colour for pink: every pink requirement but the count fails.
    # decompose(): entity and attribute per object, count, spatial -> pink's entity,
    # attribute and the spatial fail, 3 of 6 pass.
    assert first["concept"] == {**NONE, "rubric": 0.5} and first["concept-ref"] == {**ALL, "rubric": 1.0}
    assert second["concept"] == {**ALL, "rubric": 1.0}
    assert report["stages"][sft]["checkpoint"].endswith("step_00000008")
    with open(os.path.join(out, "stages.md")) as f:
        table = f.read()
    assert "| 0% / 0% / 0% / **0%** | 100% / 100% / 100% / **100%** | 0.500 |" in table
    # one strip per (set, run): 2 sets x 2 runs, 8 cells of 128 px (+ 28 caption) under a 16 px label
    assert Image.open(os.path.join(out, "stages.png")).size == (8 * 128, 4 * (16 + 128 + 28))


def test_stages_of_different_models_are_refused(tmp_path, encoder_dir, stub_weights):
    base = _run_dir(tmp_path / "base", encoder_dir)
    other = _run_dir(tmp_path / "other", encoder_dir)
    cfg = OmegaConf.load(os.path.join(other, "config.yaml"))
    cfg.model.dim = 2 * cfg.model.dim
    OmegaConf.save(cfg, os.path.join(other, "config.yaml"))
    with pytest.raises(ValueError, match="different model"):
        ev.compare_stages([base, other], str(tmp_path / "out"), seeds=1, steps=1, prompts=["held-out"])


# ---- samplers: --turbo, --mu, and one row per RUN[+LORA[:SCALE]]...[@SAMPLER] spec ----------
def _tdm_run(path, encoder_dir, segments=3, mu=0.7, step=200) -> str:
    run = _run_dir(path, encoder_dir, step=step)
    cfg = OmegaConf.load(os.path.join(run, "config.yaml"))
    cfg.name, cfg.stage.name, cfg.stage.kind = path.name, "tdm", "tdm"
    cfg.stage.tdm.segments, cfg.stage.tdm.mu = segments, mu
    OmegaConf.save(cfg, os.path.join(run, "config.yaml"))
    return run


@pytest.fixture
def samplers_used(stub_weights, monkeypatch):
    """The (steps, guidance, mu) of every generate call, after the stub's own."""
    used = []

    def generate(model, encode, decode, prompts, seeds, model_cfg, latent_hw, steps, guidance, device, mu=None):
        used.append((steps, guidance, mu))
        return _fake_generate(model, encode, decode, prompts, seeds, model_cfg, latent_hw, steps, guidance, device)

    monkeypatch.setattr(ev, "generate", generate)
    return used


def test_turbo_takes_a_tdm_runs_segments_and_mu_and_flags_override(tmp_path, encoder_dir, samplers_used, capsys):
    tdm = _tdm_run(tmp_path / "tdm", encoder_dir, segments=3, mu=0.7)
    ev.main([tdm, "--turbo", "--seeds", "1", "--prompts", "held-out"])
    assert set(samplers_used) == {(3, 0.0, 0.7)}  # baseline and student alike
    with open(os.path.join(tdm, "eval.json")) as f:
        report = json.load(f)
    assert (report["steps"], report["guidance"], report["mu"], report["mu_pinned"]) == (3, 0.0, 0.7, True)
    assert "3 Euler steps, guidance 0.0, mu 0.7 (pinned)" in capsys.readouterr().out
    samplers_used.clear()
    ev.main([tdm, "--turbo", "--steps", "5", "--mu", "0.2", "--seeds", "1", "--prompts", "held-out"])
    assert set(samplers_used) == {(5, 0.0, 0.2)}
    samplers_used.clear()
    plain = _run_dir(tmp_path / "plain", encoder_dir)  # not a TDM run: Krea 2 Turbo's sampler
    ev.main([plain, "--turbo", "--guidance", "1.5", "--seeds", "1", "--prompts", "held-out"])
    assert set(samplers_used) == {(8, 1.5, 1.15)}


def test_stage_specs_give_one_row_per_sampler_and_lora(tmp_path, encoder_dir, stub_weights, samplers_used):
    base = _run_dir(tmp_path / "base", encoder_dir, step=30)
    tdm = _tdm_run(tmp_path / "demo_tdm", encoder_dir, segments=4, mu=0.5)
    pink = str(tmp_path / "demo_pink")
    out = str(tmp_path / "stages")
    specs = [f"{base}@steps=6,guidance=2", f"{base}@steps=8,guidance=0,mu=0.25", f"{tdm}@turbo",
             f"{tdm}+{pink}:0.5@turbo,mu=0.9", f"{base}@turbo", base]
    ev.main([*specs, "--out", out, "--seeds", "1", "--steps", "2", "--prompts", "concept"])
    # the weights of each row: LoRAs merged onto theirs only
    assert stub_weights == [(base, "ema", ())] * 2 + [(tdm, "ema", ()), (tdm, "ema", ((pink, 0.5),))] + \
        [(base, "ema", ())] * 2
    with open(os.path.join(out, "stages.json")) as f:
        report = json.load(f)
    rows = report["stages"]
    assert list(rows) == specs and report["steps"] is None  # the rows' samplers differ
    auto_mu = shift_mu(64)  # 32 px pixels, patch 4: 64 image tokens
    settings = [(rows[s]["steps"], rows[s]["guidance"], rows[s]["mu"], rows[s]["loras"]) for s in specs]
    assert settings == [(6, 2.0, auto_mu, []), (8, 0.0, 0.25, []), (4, 0.0, 0.5, []), (4, 0.0, 0.9, [[pink, 0.5]]),
                        (8, 0.0, 1.15, []), (2, 3.0, auto_mu, [])]
    # each row generated with its own sampler: two sets (concept, concept-ref) per row
    assert samplers_used == [x for x in [(6, 2.0, None), (8, 0.0, 0.25), (4, 0.0, 0.5), (4, 0.0, 0.9),
                                         (8, 0.0, 1.15), (2, 3.0, None)] for _ in range(2)]
    assert rows[specs[2]]["label"] == "demo_tdm (tdm, step_00000200) · 4 steps, g 0, mu 0.5"
    assert rows[specs[3]]["label"] == "demo_tdm (tdm, step_00000200) + demo_pink x0.5 · 4 steps, g 0, mu 0.9"
    assert rows[specs[0]]["label"].endswith("· 6 steps, g 2")  # mu from the image-token count
    with open(os.path.join(out, "stages.md")) as f:
        md = f.read()
    assert md.startswith("1 seeds per prompt, each row's sampler in its label\n")
    assert f"| {rows[specs[3]]['label']} | 100% / 100% / 100% / **100%** |" in md  # the LoRA knows pink
    assert f"| {rows[specs[2]]['label']} | 0% / 0% / 0% / **0%** |" in md


def test_bad_stage_specs_say_what_is_allowed(tmp_path, encoder_dir, stub_weights):
    base = _run_dir(tmp_path / "base", encoder_dir)
    for spec, message in [(f"{base}@steps=0", "steps=N"), (f"{base}@fast", "'fast' is not a sampler setting"),
                          (f"{base}@", "nothing after '@'"), (f"{base}+@turbo", r"\+LORA\[:SCALE\]"),
                          (f"{base}@mu=1,mu=2", "'mu' given twice")]:
        with pytest.raises(ValueError, match=message) as e:
            ev.compare_stages([base, spec], str(tmp_path / "out"), seeds=1, prompts=["held-out"])
        assert spec in str(e.value)
    with pytest.raises(ValueError, match="same row"):  # @turbo on a non-TDM run is spelled-out Turbo
        ev.compare_stages([f"{base}@turbo", f"{base}@steps=8,guidance=0,mu=1.15"], str(tmp_path / "out"), seeds=1,
                          prompts=["held-out"])


def test_a_rows_sampler_gives_generates_images_bitwise(tmp_path, encoder_dir, monkeypatch):
    from trainer.model import K2DiT
    from trainer.sample import generate, to_uint8

    run = _run_dir(tmp_path / "demo", encoder_dir)
    cfg, data = ev.shapes_data(run)
    torch.manual_seed(0)
    model = K2DiT(cfg.model)
    for p in model.parameters():  # random everywhere (zero-initialised outputs draw grey)
        torch.nn.init.normal_(p, std=0.05)
    monkeypatch.setitem(sys.modules, "trainer.weights",
                        types.SimpleNamespace(load_weights=lambda source, which="ema", loras=(), model_cfg=None: model))
    out = tmp_path / "stages"
    specs = [f"{run}@steps=3,guidance=2,mu=0.9", f"{run}@steps=3,guidance=2"]
    with torch.no_grad():
        ev.compare_stages(specs, str(out), seeds=1, prompts=["held-out"])
    prompts = data.world.held_out_prompts()
    grid = np.asarray(Image.open(out / "stages.png"))
    for row, mu in enumerate([0.9, None]):
        expected = to_uint8(generate(model, data.encoder.encode, data.latents.decode, prompts, list(range(8)),
                                     cfg.model, (32, 32), 3, 2.0, torch.device("cpu"), mu=mu))
        top = row * (16 + 128 + 28) + 16  # a strip: 16 px label, 128 px cells (32 px images x4), 28 px captions
        written = np.stack([grid[top:top + 128:4, c * 128:(c + 1) * 128:4] for c in range(8)])
        assert np.array_equal(written, expected), row
    assert not np.array_equal(grid[16:144], grid[16 + 172:144 + 172])  # mu reached the sampler
