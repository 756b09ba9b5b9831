#!/usr/bin/env bash
# Regenerate the CPU method study of docs/results.md from nothing: download the Python 3.11 documentation sources
# (Debian package python3.11-doc, PSF License v2), build the corpus, train a 4096-piece BPE tokenizer, prepare
# train/validation shards (3% of documents held out, seed 0), run the study (resumable: rerun after an
# interruption), and draw the plots and the rank analysis into docs/results/.
#   bash tools/study_pydocs.sh                    # about 7 hours on 2 CPU cores (15 methods, 8 seed runs)
# Environment: SRC (download folder), OUT (study folder), FIGS (figures folder).
set -euo pipefail
cd "$(dirname "$0")/.."
SRC=${SRC:-data/generated/pydocs-src}
OUT=${OUT:-runs/study_cpu_pydocs}
FIGS=${FIGS:-docs/results}
DATA=data/generated/pydocs
PY=${PYTHON:-python}

mkdir -p "$SRC"
if [ ! -f "$SRC/corpus.jsonl" ]; then
  if ! ls "$SRC"/python3.11-doc_*.deb >/dev/null 2>&1; then
    (cd "$SRC" && apt-get download python3.11-doc)
  fi
  dpkg-deb -x "$SRC"/python3.11-doc_*.deb "$SRC/x"
  "$PY" -m megatron_pept.study.corpus "$SRC/x/usr/share/doc/python3.11/html/_sources" "$SRC/corpus.jsonl"
fi
if [ ! -f "$SRC/tok/tokenizer.model" ]; then
  "$PY" tools/train_tokenizer.py --input "$SRC/corpus.jsonl" --vocab-size 4096 --output "$SRC/tok" --max-sentences 0
fi
if [ ! -f "$DATA/index.json" ]; then
  "$PY" tools/prepare_data.py --input "$SRC/corpus.jsonl" --tokenizer "$SRC/tok" --output "$DATA" \
    --val-fraction 0.03 --seed 0 --no-progress
fi
"$PY" tools/study.py configs/studies/cpu_pydocs.yaml --output "$OUT"
# Figures: the final runs' curves, and the rank of the update from step 200 (after ReLoRA's 150-step warm start)
# to the end for full, ReLoRA, GaLore and LoRA (ReLoRA Figures 3 and 4).
"$PY" tools/plot_runs.py "$OUT"/final/* --output "$FIGS" --smooth 10
CK=checkpoints/step_00000200
"$PY" tools/analyze_rank.py --output "$FIGS/rank" --threshold 0.1 \
  --pair full "$OUT/final/full/$CK" "$OUT/final/full" \
  --pair relora "$OUT/final/relora/$CK" "$OUT/final/relora" \
  --pair galore "$OUT/final/galore/$CK" "$OUT/final/galore" \
  --pair lora "$OUT/final/lora/$CK" "$OUT/final/lora"
