#!/usr/bin/env bash
# Reproduces the built-in demonstration model Resources/Models/cmedl-demo-unet.safetensors (CPU, about an hour
# on 2 cores). The shipped model was trained in two stages on the same data: epochs 1-19 with
# tumour_patch_fraction 0.7 and a per-sample Dice loss, then epochs 20-30 with tumour_patch_fraction 0.5 and the
# batch Dice loss the engine now uses; the student of epoch 30 was kept. The single command below is the
# current engine's equivalent; expect a comparable, not a bit-identical, model.
set -euo pipefail
cmedl phantom demo_data --ct 20 --mr 0 --seed 7 --size 256 --progress none
cmedl train --method ct_only --ct demo_data/ct --out demo_run --segmentor unet \
  --epochs 30 --iterations-per-epoch 40 --batch-size 8 --patch-size 128 --seed 7 --device cpu \
  --set 'segmentor_options={"base_channels": 16}' --set 'spacing_mm=[2.0, 2.0]' \
  --set tumour_patch_fraction=0.5 --set early_stopping_patience=10 --set name=cmedl-demo-unet
# then copy demo_run/model.safetensors to Resources/Models/cmedl-demo-unet.safetensors
