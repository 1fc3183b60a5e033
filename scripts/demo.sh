#!/usr/bin/env bash
# The demo: sets up .venv if needed, then
#   ingest    Krablet ingestion: `krablet.pipeline` submits a job that trains the shapes
#             autoencoder (runs/<name>/autoencoder, the latent space), one shard-writing
#             job per chunk of the shapes world that depends on it, and an index job that
#             depends on those, to an embedded PostgreSQL in runs/<name>/krablet, and
#             drains them with 2 workers;
#   pretrain  trains the demo model on those shards on CPU;
#   evaluate  scores what it learned against the untrained model;
#   curate    a raw pool of 4000 images with planted problems (data/shapes_curation.py:
#             generated-looking images, JPEG blocks, noise, duplicates, stylistic blur to
#             keep, a rare concept) goes through krablet.curate's jobs: embed, defect and
#             synthetic filters, safety, dedup, hierarchical k-means, balanced weights; it
#             prints what each stage dropped and why, and writes runs/<name>/curation/shards;
#   midtrain  the base continues on that pool drawn by the balanced weights; the rare
#             concept's accuracy before and after (runs/<name>_midtrain_eval);
#   concept   Krablet writes shards of a colour pretraining never saw ("pink"), training
#             and held-out validation sets, with the base's own text encoder;
#   lora      fine-tunes a LoRA on the base to draw it (stage=sft, validation loss);
#   compare   scores the LoRA against its base: the new colour, the same prompts with a
#             colour the base knows, and the base's own prompts (runs/<name>_pink/eval.png);
#   artifact  trains the artifact reward's classifier (clean world images against JPEG
#             blocks, noise, grids, over-saturation) into runs/<name>/artifact;
#   dpo       flow DPO from the LoRA run on pairs of its own samples ranked by the rubric;
#   grpo      GRPO from the DPO run with the rubric reward (artifact and diversity logged,
#             the artifact score guarding it);
#   stages    scores pretraining, SFT, DPO and GRPO on the same prompts and seeds: one
#             table (rubric checks, artifact, diversity) and one grid in runs/<name>_stages;
#   tdm       TDM distils the GRPO model into an 8-step, guidance-free student (Turbo);
#   turbo     a row per sampler on held-out prompts: the teacher at 50 steps with guidance
#             3 and at 8 steps without, the student at its 8 steps (runs/<name>_turbo).
# Extra arguments are Hydra overrides of the pretraining (e.g. stage.steps=800 name=longer).
# `K2_DEMO_STAGES="lora compare" bash scripts/demo.sh` runs only those stages.
# Interrupt it and run it again: finished jobs are not redone and training resumes
# from its last checkpoint.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup.sh"
cd "$root"
py="${K2_VENV:-$root/.venv}/bin/python"
name=demo
for arg in "$@"; do [[ "$arg" == name=* ]] && name="${arg#name=}"; done
stages="${K2_DEMO_STAGES:-ingest pretrain evaluate curate midtrain concept lora compare artifact dpo grpo stages tdm turbo}"
samples="${K2_DEMO_SAMPLES:-24000}"  # 2800 steps x batch 32: under four epochs
write=(--chunk-size 2000 --resolution 32 --bucket-multiple 16 --latents shapes_ae --vae-path "runs/$name/autoencoder"
       --text-len 16 --workers 2 --run-dir "runs/$name/krablet")
run() { [[ " $stages " == *" $1 "* ]]; }

run ingest && "$py" -m krablet.pipeline --input "shapes:$samples:32" --output "runs/$name/shards" "${write[@]}"
run pretrain && "$py" -m trainer.train experiment=demo "$@"
run evaluate && "$py" -m trainer.evaluate "runs/$name" --seeds 4
cur="runs/$name/curation"
if run curate; then
  [[ -f "$cur/raw/captions.jsonl" ]] || "$py" -m data.shapes_curation --out "$cur/raw" --n 4000
  [[ -d "$cur/labelled/style-blur" ]] || "$py" -m krablet.curate --make-labelled "$cur/labelled"
  "$py" -m krablet.curate --input "$cur/raw" --output "$cur" --labelled "$cur/labelled" --rare pink \
    --encoder "runs/$name/shards/text_encoder" --resolution 32 --bucket-multiple 16 --text-len 16 \
    --latents shapes_ae --vae-path "runs/$name/autoencoder" --chunk-size 1000 --levels 64 16 4 2 --workers 2
fi
if run midtrain; then
  mid=("data.path=$cur/shards" "data.encoder_path=runs/$name/shards/text_encoder"
       "data.vae_path=runs/$name/autoencoder" "checkpoint.init_from=runs/$name")
  "$py" -m trainer.train experiment=demo_midtrain "name=${name}_midtrain" "data.weights=$cur/shards/weights.npz" "${mid[@]}"
  "$py" -m trainer.evaluate "runs/$name" "runs/${name}_midtrain" \
    --prompts concept-seen,held-out --seeds 4 --out "runs/${name}_midtrain_eval"
fi
if run concept; then
  "$py" -m krablet.pipeline --input "shapes-pink-mix:4800:32" --output "runs/$name/shards_pink" \
    --encoder "runs/$name/shards/text_encoder" "${write[@]}"
  "$py" -m krablet.pipeline --input "shapes-pink-val:256:32" --output "runs/$name/shards_pink_val" \
    --encoder "runs/$name/shards/text_encoder" "${write[@]}"
fi
pink=(experiment=demo_lora "name=${name}_pink" "data.path=runs/$name/shards_pink"
      "data.encoder_path=runs/$name/shards/text_encoder" "stage.validation.path=runs/$name/shards_pink_val"
      "checkpoint.init_from=runs/$name")
run lora && "$py" -m trainer.train "${pink[@]}"
run compare && "$py" -m trainer.evaluate "runs/${name}_pink" --prompts concept-seen,concept,held-out,training --seeds 4
if run artifact && [[ ! -f "runs/$name/artifact/config.json" ]]; then  # written last: a finished head
  "$py" -m rl.rewards.artifact --out "runs/$name/artifact" --image-size 32
fi
rl=("data.path=runs/$name/shards" "data.encoder_path=runs/$name/shards/text_encoder"
    "data.vae_path=runs/$name/autoencoder")
run dpo && "$py" -m trainer.train experiment=demo_dpo "name=${name}_dpo" "checkpoint.init_from=runs/${name}_pink" \
  "${rl[@]}"
run grpo && "$py" -m trainer.train experiment=demo_grpo "name=${name}_grpo" "checkpoint.init_from=runs/${name}_dpo" \
  "${rl[@]}" "++stage.grpo.reward_options={artifact:{path:runs/$name/artifact}}"
run stages && "$py" -m trainer.evaluate "runs/$name" "runs/${name}_pink" "runs/${name}_dpo" "runs/${name}_grpo" \
  --out "runs/${name}_stages" --seeds 4 --reward "artifact:path=runs/$name/artifact" --reward diversity
run tdm && "$py" -m trainer.train experiment=demo_tdm "name=${name}_tdm" "checkpoint.init_from=runs/${name}_grpo" \
  "${rl[@]}"
run turbo && "$py" -m trainer.evaluate "runs/${name}_grpo@steps=50,guidance=3" "runs/${name}_grpo@steps=8,guidance=0,mu=0.5" \
  "runs/${name}_tdm@turbo" --prompts held-out --seeds 4 --out "runs/${name}_turbo"
exit 0
