#!/usr/bin/env bash
# The demo: sets up .venv if needed, then
#   ingest    Krablet ingestion: `krablet.pipeline` submits a job that trains the shapes
#             autoencoder (runs/<name>/autoencoder, the latent space), one shard-writing
#             job per chunk of the shapes world that depends on it, and an index job that
#             depends on those, to an embedded PostgreSQL in runs/<name>/krablet, and
#             drains them with 2 workers;
#   pretrain  trains the demo model on those shards on CPU;
#   evaluate  scores what it learned against the untrained model;
#   concept   Krablet writes shards of a colour pretraining never saw ("pink"), training
#             and held-out validation sets, with the base's own text encoder;
#   lora      fine-tunes a LoRA on the base to draw it (stage=sft, validation loss);
#   compare   scores the LoRA against its base: the new colour, the same prompts with a
#             colour the base knows, and the base's own prompts (runs/<name>_pink/eval.png).
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
stages="${K2_DEMO_STAGES:-ingest pretrain evaluate concept lora compare}"
samples="${K2_DEMO_SAMPLES:-24000}"  # 2800 steps x batch 32: under four epochs
write=(--chunk-size 2000 --resolution 32 --bucket-multiple 16 --latents shapes_ae --vae-path "runs/$name/autoencoder"
       --text-len 16 --workers 2 --run-dir "runs/$name/krablet")
run() { [[ " $stages " == *" $1 "* ]]; }

run ingest && "$py" -m krablet.pipeline --input "shapes:$samples:32" --output "runs/$name/shards" "${write[@]}"
run pretrain && "$py" -m trainer.train experiment=demo "$@"
run evaluate && "$py" -m trainer.evaluate "runs/$name" --seeds 4
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
exit 0
