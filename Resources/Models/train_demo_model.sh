#!/usr/bin/env bash
# Reproduces the built-in demonstration model Resources/Models/cmedl-demo-unet.safetensors: a CT student (U-Net,
# 16 base channels) trained with CMEDL on unpaired phantoms, 20 labelled CTs and 10 MRIs (seed 7, 256 px):
# CycleGAN translator with the contextual loss, MRI teacher, hint losses, the paper's loss weights.
# Deviation from the paper: the contextual loss runs on a randomly initialised VGG16 unless VGG_WEIGHTS names a
# saved ImageNet VGG16 state dict (the model card records which).
# A GPU is needed in practice: the shipped model (2026-11-28) took 6 minutes on one H200 (bf16) beside three other
# trainings (about 3.5 minutes alone), while one of its 1200 CMEDL steps takes minutes on a CPU core. Other
# hardware gives a comparable, not a bit-identical, model.
#
# Usage: bash Resources/Models/train_demo_model.sh [WORK_DIR [DESTINATION]]
#   DESTINATION defaults to WORK_DIR/cmedl-demo-unet.safetensors; give Resources/Models/cmedl-demo-unet.safetensors
#   to replace the shipped model.
set -euo pipefail
WORK=${1:-demo_training}
DESTINATION=${2:-$WORK/cmedl-demo-unet.safetensors}
PYTHON=${PYTHON:-python3}
"$PYTHON" -m cmedl phantom "$WORK/data" --ct 20 --mr 10 --seed 7 --size 256 --progress none
"$PYTHON" -m cmedl train --method cmedl --ct "$WORK/data/ct" --mr "$WORK/data/mr" --out "$WORK/run" \
  --segmentor unet --epochs 30 --iterations-per-epoch 40 --batch-size 8 --patch-size 128 --seed 7 \
  --device "${DEVICE:-auto}" --set 'segmentor_options={"base_channels": 16}' --set 'spacing_mm=[2.0, 2.0]' \
  --set tumour_patch_fraction=0.5 --set early_stopping_patience=10 --set name=cmedl-demo-unet \
  --set "vgg_weights=${VGG_WEIGHTS:-random}" --progress "${PROGRESS:-text}"
"$PYTHON" "$(dirname "$0")/finish_demo_model.py" "$WORK/run/model.safetensors" "$DESTINATION"
