#!/usr/bin/env bash
# The quickstart, on the CPU: set up .venv, show the model (counts, a forward pass with an image,
# KV-cache generation, the same logits from transformers), then the whole workflow on the shapes
# world: make the data, train a tokenizer, train model=tiny (recipe=quickstart), measure its answer
# accuracy on the test split, export it to a Hugging Face directory and ask it about an image;
# last, its training curves (curves.png).
#
#   bash scripts/quickstart.sh [key=value ...]      # overrides go to the training run
#
# Everything goes to runs/quickstart (QUICKSTART_DIR to change it); re-running resumes or reuses
# what is there.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/setup_env.sh
OUT=${QUICKSTART_DIR:-runs/quickstart}
DATA=$OUT/data

echo "== 1/6 the model"
python scripts/quickstart.py

echo "== 2/6 the shapes world -> $DATA"
if [[ ! -f $DATA/meta.json ]]; then
  python -m data_tools.make_shapes --out "$DATA" --seed 0 --no-wds
fi

echo "== 3/6 a tokenizer -> $DATA/tokenizer"
if [[ ! -f $DATA/tokenizer/tokenizer.model ]]; then
  python -m data_tools.train_tokenizer --input "$DATA/text_train.jsonl" "$DATA/chat_train.jsonl" \
    --out "$DATA/tokenizer" --vocab-size 1024
fi

echo "== 4/6 training model=tiny (recipe=quickstart) -> $OUT/run"
python -m aria.train recipe=quickstart run_dir="$OUT/run" \
  "data.train=[{path:'$DATA/dialog_train.jsonl',weight:1},{path:'$DATA/caption_train.jsonl',weight:1}]" \
  data.tokenizer="$DATA/tokenizer" logging.wandb=disabled "$@"

echo "== 5/6 answer accuracy on the test split"
aria-eval "$OUT/run" "$DATA/chat_test.jsonl" --batch-size 32 --out "$OUT/eval.jsonl"

echo "== 6/6 export to Hugging Face ($OUT/hf) and ask about a test image"
aria-convert to-hf "$OUT/run" "$OUT/hf"
head -4 "$DATA/chat_test.jsonl" > "$DATA/ask.jsonl"   # four questions about test image 0
aria-generate "$OUT/hf" --batch "$DATA/ask.jsonl" --out "$OUT/answers.jsonl" --greedy --max-new-tokens 8
python - "$DATA/ask.jsonl" "$OUT/answers.jsonl" <<'PY'
import json, sys
asked = [json.loads(line) for line in open(sys.argv[1])]
answers = [json.loads(line) for line in open(sys.argv[2])]
for record, answer in zip(asked, answers):
    question = record["messages"][0]["content"][1]["text"]
    print(f"{question:32s} model: {answer['answer'].strip():14s} truth: {answer['reference']}")
PY
python -m aria.tools.plot "$OUT/run" --out "$OUT/curves.png" --smooth 20   # the training curves
