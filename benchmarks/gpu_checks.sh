#!/usr/bin/env bash
# Everything that needs a CUDA device, with figures and logs written to OUT. Steps (STEPS selects, default all
# but `steps` and `compare`, which the 15-minute device budget of one session does not hold beside the others):
#   modes   GPU inference per slice: eager against a CUDA graph and torch.compile (benchmarks/gpu_inference_modes.py);
#   bench   `cmedl bench --device cuda --json`: matmul peak, each segmentor per slice, a whole 512x512x150 CT by
#           stage; alone on the GPU, so that its timings are not shared with training;
#   tests   the CUDA tests (Testing/test_gpu.py), run beside the trainings below;
#   steps   seconds per training iteration, CMEDL against CT only, fp32 / bf16 / fp16, paper sizes;
#   speed   the issue's GPU targets in one go (not in the default set): `cmedl bench` with the paper U-Net and a
#           whole 512x512x300 CT by stage (with and without the prefetch thread), the pinned-prefetch test, then
#           one CMEDL iteration at paper sizes in bf16, eager against torch.compile (its compilation paid in the
#           warm-up and reported);
#   demo    the demo model's CMEDL training (Resources/Models/train_demo_model.sh, seed 7);
#   hint0   its twin with lambda_hint = 0: same seed, data, networks and losses except the hint, so that the
#           difference between the two students is the hint's alone, free of training noise;
#   ctonly  the same recipe with method ct_only (same data, network, seed 7 and number of student steps);
#   ctonly2 the same with seed 8, which measures how far two CT-only students differ by seed alone;
#   compare the students on 10 held-out phantom CTs (benchmarks/compare_models.py); it also runs on a CPU
#           afterwards, on the model files this script brings back.
# The trainings run side by side on the one GPU (each is far from filling it) and share one deadline: a stop
# request (SIGTERM) at BUDGET_S - 40 s makes each keep its best student so far. The demo phantoms are written
# while `modes` and `bench` run.
#
# Usage: [STEPS="bench demo"] [BUDGET_S=580] bash benchmarks/gpu_checks.sh OUT   (repository root)
set -u
OUT=${1:?usage: bash benchmarks/gpu_checks.sh OUT}
BUDGET_S=${BUDGET_S:-580}
STEPS=" ${STEPS:-modes bench tests demo hint0 ctonly ctonly2} "
PYTHON=${PYTHON:-python3}
# smaller values for a trial of this script without a GPU: DEVICE=cpu EPOCHS=1 ITERATIONS=2 PHANTOM="--ct 3 --mr 2 --size 96"
DEVICE=${DEVICE:-cuda} EPOCHS=${EPOCHS:-30} ITERATIONS=${ITERATIONS:-40}
PHANTOM=${PHANTOM:---ct 20 --mr 10 --size 256}
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
  echo "-- $2: $(tail -1 "$1/train.log" 2>/dev/null)"
}

nvidia-smi -L | tee "$LOGS/device.txt"
"$PYTHON" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)' | tee -a "$LOGS/device.txt"

training_steps="demo hint0 ctonly ctonly2"
training_wanted=false
for step in $training_steps compare; do wanted "$step" && training_wanted=true; done
if $training_wanted; then
  "$PYTHON" -m cmedl phantom "$WORK/data" $PHANTOM --seed 7 --progress none \
    >"$LOGS/demo_data.log" 2>&1 &
  data_pid=$!
fi

if wanted modes; then
  echo "== inference modes: eager, CUDA graph, torch.compile ($(left) s left)"
  timeout 80 "$PYTHON" benchmarks/gpu_inference_modes.py --segmentors unet,builtin --batch-sizes 32,1 \
    --json "$LOGS/inference_modes.json" 2>&1 | tee "$LOGS/inference_modes.log" | grep -v Warning | tail -6
fi

if wanted bench; then
  echo "== inference speed ($(left) s left)"
  timeout 120 "$PYTHON" -m cmedl bench --device "$DEVICE" --batch-sizes 1,8,32 --repeats 3 --json \
    >"$LOGS/bench.json" 2>"$LOGS/bench.log"
  echo "exit status $?"; tail -3 "$LOGS/bench.log"
fi

if wanted speed; then
  echo "== GPU targets: U-Net per slice, a 512x512x300 CT, a CMEDL iteration eager and compiled ($(left) s left)"
  timeout 150 "$PYTHON" -m cmedl bench --device "$DEVICE" --segmentors unet --batch-sizes 8,32,64 --slices 300 \
    --repeats 3 --json >"$LOGS/bench_300.json" 2>"$LOGS/bench_300.log"
  echo "exit status $?"; tail -6 "$LOGS/bench_300.log"
  timeout 60 "$PYTHON" -m pytest Testing/test_prefetch.py -m gpu -q -p no:cacheprovider -rs 2>&1 | tail -2
  timeout 300 "$PYTHON" benchmarks/train_step_time.py --methods cmedl --amp bf16 --compile --warmup 5 --steps 20 \
    --json "$LOGS/step_compile.json" 2>&1 | tee "$LOGS/step_compile.log" | grep -v Warning | tail -5
fi

if wanted steps; then
  echo "== seconds per training iteration ($(left) s left)"
  timeout 100 "$PYTHON" benchmarks/train_step_time.py --steps 20 --json "$LOGS/step_time.json" 2>&1 \
    | tee "$LOGS/step_time.log"
fi

if $training_wanted; then
  wait "$data_pid" || { echo "demo data failed"; cat "$LOGS/demo_data.log"; }
  echo "== demo data written ($(left) s left)"
fi

# The demo recipe, as Resources/Models/train_demo_model.sh runs it; extra arguments change the method or add values.
train_recipe() {  # train_recipe NAME SEED ARGS...
  local name=$1 seed=$2
  shift 2
  OMP_NUM_THREADS=3 timeout --signal=TERM --kill-after=30 "$deadline" "$PYTHON" -m cmedl train \
    --ct "$WORK/data/ct" --out "$WORK/$name" --segmentor unet --epochs "$EPOCHS" --iterations-per-epoch "$ITERATIONS" \
    --batch-size 8 --patch-size 128 --seed "$seed" --device "$DEVICE" --set 'segmentor_options={"base_channels": 16}' \
    --set 'spacing_mm=[2.0, 2.0]' --set tumour_patch_fraction=0.5 --set early_stopping_patience=10 \
    --set "name=$name" --progress none "$@" >"$LOGS/$name.log" 2>&1
  echo "$name: exit status $? after $SECONDS s"
}
cmedl_arguments=(--method cmedl --mr "$WORK/data/mr" --set vgg_weights=random)
deadline=$(( $(left) - 40 ))
pids=()
if wanted demo; then train_recipe cmedl-demo-unet 7 "${cmedl_arguments[@]}" & pids+=($!); fi
if wanted hint0; then train_recipe cmedl-hint0-demo-recipe 7 "${cmedl_arguments[@]}" --set lambda_hint=0 & pids+=($!); fi
if wanted ctonly; then train_recipe ct-only-demo-recipe 7 --method ct_only & pids+=($!); fi
if wanted ctonly2; then train_recipe ct-only-demo-recipe-seed8 8 --method ct_only & pids+=($!); fi
[ ${#pids[@]} -gt 0 ] && echo "== ${#pids[@]} trainings started, stop requested after $deadline s ($(left) s left)"

if wanted tests; then
  echo "== CUDA tests ($(left) s left)"
  timeout 150 "$PYTHON" -m pytest Testing/test_gpu.py Testing/test_prefetch.py -m gpu -q -p no:cacheprovider -rs 2>&1 | tee "$LOGS/gpu_tests.log" \
    | tail -5
fi

for pid in "${pids[@]}"; do wait "$pid"; done
if wanted demo && [ -f "$WORK/cmedl-demo-unet/model.safetensors" ]; then
  "$PYTHON" Resources/Models/finish_demo_model.py "$WORK/cmedl-demo-unet/model.safetensors" \
    "$OUT/cmedl-demo-unet.safetensors" >>"$LOGS/cmedl-demo-unet.log" 2>&1
  for file in metrics.jsonl status.json run.json train.log; do
    cp "$WORK/cmedl-demo-unet/$file" "$LOGS/cmedl-demo-unet.$file" 2>/dev/null
  done
  echo "-- cmedl-demo-unet: $(tail -1 "$WORK/cmedl-demo-unet/train.log" 2>/dev/null)"
fi
for name in cmedl-hint0-demo-recipe ct-only-demo-recipe ct-only-demo-recipe-seed8; do
  [ -d "$WORK/$name" ] && keep_run "$WORK/$name" "$name"
done

if wanted compare; then
  echo "== students on held-out phantom CTs ($(left) s left)"
  models=()
  for model in "$OUT"/ct-only-demo-recipe.safetensors "$OUT"/*.safetensors Resources/Models/cmedl-demo-unet.safetensors; do
    [ -f "$model" ] && [[ " ${models[*]-} " != *" $model "* ]] && models+=("$model")
  done
  timeout $(( $(left) - 5 )) "$PYTHON" benchmarks/compare_models.py "${models[@]}" --cases 10 --size 256 \
    --device "$DEVICE" --json "$LOGS/compare.json" 2>&1 | tee "$LOGS/compare.log"
fi
echo "== done in $SECONDS s"
