#!/usr/bin/env bash
# Throughput on a GPU, in one run, for the README's GPU figures: the workload suite side by side
# with SentenceTransformerTrainer at its fastest setup, the padded layouts on the medium workload,
# and a torch.profiler table of embedtune's steps.
#
#   launch/gpu_bench.sh OUT_DIR [MODEL]
#
# MODEL: a model folder or Hub name (default all-MiniLM-L6-v2); a folder with only config.json
# and the tokenizer runs that architecture with random weights (speed does not depend on them).
# STEPS (timed steps, as many warm up; default 20), SUITE (workload names; default all) and
# PYTHON (the interpreter with embedtune installed; default python) may be set in the
# environment. Each figure is also written as JSON to OUT_DIR.
set -euo pipefail
out=${1:?usage: launch/gpu_bench.sh OUT_DIR [MODEL]}
model=${2:-sentence-transformers/all-MiniLM-L6-v2}
steps=${STEPS:-20}
python=${PYTHON:-python}
read -r -a suite <<< "${SUITE:-}"
mkdir -p "$out"
bench() { "$python" -m embedtune bench throughput --model "$model" --steps "$steps" "$@"; }

bench --suite "${suite[@]}" --compare --json "$out/suite.json" 2>&1 | tee "$out/suite.log"

# The medium workload (python docs, length 256) in the padded layouts, at the suite's GPU batch.
batch=$("$python" -c "import torch; print(512 if torch.cuda.is_available() else 64)")
for variant in "chunks:--no-unpad" "block:--no-unpad --padded_chunks 1" "grouped:--no-unpad --group_by_length 16"; do
    name=${variant%%:*}
    # shellcheck disable=SC2086
    bench --batch_size "$batch" --max_length 256 ${variant#*:} --json "$out/$name.json" 2>&1 | tee "$out/$name.log"
done

bench --batch_size "$batch" --max_length 256 --profile "$out/profile.txt" --json "$out/profiled.json" \
    2>&1 | tee "$out/profiled.log"
echo "figures in $out: suite.json, chunks.json, block.json, grouped.json, profile.txt"
