#!/usr/bin/env bash
# Everything that needs a CUDA device, with figures and logs written to OUT. Steps (STEPS selects, default all):
#   tests   the CUDA tests (Testing/test_gpu.py: mixed-precision training steps, a run on the GPU, GPU inference);
#   steps   seconds per training iteration, CMEDL against CT only, fp32 / bf16 / fp16, paper sizes;
#   bench   `cmedl bench --device cuda`: inference per slice and a whole 512x512x150 CT;
#   demo    the demo model's CMEDL training (Resources/Models/train_demo_model.sh);
#   ctonly  the same recipe with method ct_only (same data, network, seed and number of student steps);
#   compare the students on 10 held-out phantom CTs (benchmarks/compare_models.py), CT only first; a model file
#           named by EXTRA_MODEL joins them (for example the previously shipped demo model).
# Each step has its own time limit so that one slow step cannot take the others' time; BUDGET_S (default 540)
# is the whole pass's. The demo phantoms are written in the background while the first steps run.
#
# Usage: [STEPS="tests steps"] bash benchmarks/gpu_checks.sh OUT   (repository root, engine dependencies installed)
set -u
OUT=${1:?usage: bash benchmarks/gpu_checks.sh OUT}
BUDGET_S=${BUDGET_S:-540}
STEPS=" ${STEPS:-tests steps bench demo ctonly compare} "
PYTHON=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
WORK=$(mktemp -d)
LOGS="$WORK/logs"
mkdir -p "$OUT" "$LOGS"
# logs and figures travel as one archive beside the trained models
trap 'tar -czf "$OUT/logs.tar.gz" -C "$WORK" logs' EXIT
left() { echo $((BUDGET_S - SECONDS)); }
wanted() { [[ "$STEPS" == *" $1 "* ]]; }
keep_run() {  # keep_run RUN NAME: the run's records in the logs, its student in OUT
  for file in metrics.jsonl status.json run.json train.log; do cp "$1/$file" "$LOGS/$2.$file" 2>/dev/null; done
  cp "$1/model.safetensors" "$OUT/$2.safetensors" 2>/dev/null
  tail -2 "$1/train.log" 2>/dev/null
}

nvidia-smi -L | tee "$LOGS/device.txt"
"$PYTHON" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)' | tee -a "$LOGS/device.txt"

if wanted demo || wanted ctonly; then
  "$PYTHON" -m cmedl phantom "$WORK/data" --ct 20 --mr 10 --seed 7 --size 256 --progress none \
    >"$LOGS/demo_data.log" 2>&1 &
  data_pid=$!
fi

if wanted tests; then
  echo "== CUDA tests ($(left) s left)"
  timeout 150 "$PYTHON" -m pytest Testing/test_gpu.py -m gpu -q -p no:cacheprovider -rs 2>&1 | tee "$LOGS/gpu_tests.log"
fi

if wanted steps; then
  echo "== seconds per training iteration ($(left) s left)"
  timeout 100 "$PYTHON" benchmarks/train_step_time.py --steps 20 --json "$LOGS/step_time.json" 2>&1 \
    | tee "$LOGS/step_time.log"
fi

if wanted bench; then
  echo "== inference speed ($(left) s left)"
  timeout 120 "$PYTHON" -m cmedl bench --device cuda 2>&1 | tee "$LOGS/bench.log"
fi

if wanted demo || wanted ctonly; then
  wait "$data_pid" || { echo "demo data failed"; cat "$LOGS/demo_data.log"; }
fi

if wanted demo; then
  echo "== demo model training, CMEDL ($(left) s left)"
  # The phantoms were written above; a stop request (SIGTERM) makes the trainer keep its best student.
  sed -e '/ -m cmedl phantom /d' Resources/Models/train_demo_model.sh > "$WORK/train_demo.sh"
  limit=$(( $(left) - 150 ))
  mkdir -p "$WORK/demo" && ln -s "$WORK/data" "$WORK/demo/data"
  PROGRESS=none timeout --signal=TERM --kill-after=30 "$limit" bash "$WORK/train_demo.sh" "$WORK/demo" \
    "$OUT/cmedl-demo-unet.safetensors" >"$LOGS/demo_train.log" 2>&1
  echo "exit status $? (limit $limit s)"
  keep_run "$WORK/demo/run" cmedl_demo_run
  cp "$(ls "$WORK"/demo/run/previews/*.png 2>/dev/null | tail -1)" "$LOGS/" 2>/dev/null
fi

if wanted ctonly; then
  echo "== the demo recipe with method ct_only ($(left) s left)"
  limit=$(( $(left) - 60 ))
  timeout --signal=TERM --kill-after=30 "$limit" "$PYTHON" -m cmedl train --method ct_only --ct "$WORK/data/ct" \
    --out "$WORK/ct_only" --segmentor unet --epochs 30 --iterations-per-epoch 40 --batch-size 8 --patch-size 128 \
    --seed 7 --device cuda --set 'segmentor_options={"base_channels": 16}' --set 'spacing_mm=[2.0, 2.0]' \
    --set tumour_patch_fraction=0.5 --set early_stopping_patience=10 --set name=ct-only-demo-recipe \
    --progress none >"$LOGS/ct_only_train.log" 2>&1
  echo "exit status $? (limit $limit s)"
  keep_run "$WORK/ct_only" ct_only_demo_recipe
fi

if wanted compare; then
  echo "== students on held-out phantom CTs ($(left) s left)"
  models=()
  for model in "$OUT/ct_only_demo_recipe.safetensors" "$OUT/cmedl-demo-unet.safetensors" \
               Resources/Models/cmedl-demo-unet.safetensors ${EXTRA_MODEL:-}; do
    [ -f "$model" ] && models+=("$model")
  done
  timeout $(( $(left) - 5 )) "$PYTHON" benchmarks/compare_models.py "${models[@]}" --cases 10 --size 256 \
    --device cuda --json "$LOGS/compare.json" 2>&1 | tee "$LOGS/compare.log"
fi
echo "== done in $SECONDS s"
