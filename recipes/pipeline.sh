#!/usr/bin/env bash
# Aria's four-stage pretraining pipeline (paper section 3), each stage starting from the previous
# stage's final checkpoint:
#   1 language (text, 8K, RoPE 1e5) -> 2 multimodal (text + captions + video, 8K, RoPE 1e5)
#   -> 3 long context (64K, RoPE 5e6) -> 4 post-training (instruction JSONL, annealed LR).
#
#   DATA=/data/shapes bash recipes/pipeline.sh OUT_DIR [key=value ...]
#
# Extra key=value overrides go to every stage (e.g. model=aria, train.max_steps=...); each recipe
# keeps its own layout (parallel=node up to 8K, parallel=zero3 at 64K: two nodes for model=aria).
# Data (defaults: the shapes-world layout of `python -m data_tools.make_shapes --out $DATA`):
#   STAGE1_DATA  text shards                   ($DATA/wds/text_train-*.tar)
#   STAGE2_DATA  a weighted mix (Hydra list)   text 0.2 + caption/video 0.8 shards
#   STAGE3_DATA  long documents                ($DATA/wds/caption_train-*.tar)
#   STAGE4_DATA  instruction conversations     ($DATA/chat_train.jsonl)
#   TOKENIZER    tokenizer directory           ($DATA/tokenizer)
# Launcher: LAUNCH (default "python -m aria.train"; e.g. "torchrun --nproc_per_node=8 -m aria.train").
set -euo pipefail
OUT=${1:?usage: DATA=DIR bash recipes/pipeline.sh OUT_DIR [key=value ...]}
shift
DATA=${DATA:-}
TOKENIZER=${TOKENIZER:-$DATA/tokenizer}
STAGE1_DATA=${STAGE1_DATA:-$DATA/wds/text_train-*.tar}
MIX="[{path:'$DATA/wds/text_train-*.tar',weight:0.2},{path:'$DATA/wds/caption_train-*.tar',weight:0.8}]"
STAGE2_DATA=${STAGE2_DATA:-$MIX}
STAGE3_DATA=${STAGE3_DATA:-$DATA/wds/caption_train-*.tar}
STAGE4_DATA=${STAGE4_DATA:-$DATA/chat_train.jsonl}
LAUNCH=${LAUNCH:-python -m aria.train}

stage() {  # stage NAME RECIPE DATA [init] [overrides...]
  local name=$1 recipe=$2 data=$3 init=$4
  shift 4
  echo "== $name ($recipe) =="
  # shellcheck disable=SC2086  # LAUNCH is a command line
  $LAUNCH recipe="$recipe" run_dir="$OUT/$name" "data.train=$data" data.tokenizer="$TOKENIZER" $init "$@"
}

stage stage1 stage1_language "$STAGE1_DATA" "" "$@"
stage stage2 stage2_multimodal "$STAGE2_DATA" "init.from_checkpoint=$OUT/stage1" "$@"
stage stage3 stage3_long_context "$STAGE3_DATA" "init.from_checkpoint=$OUT/stage2" "$@"
stage stage4 stage4_post_training "$STAGE4_DATA" "init.from_checkpoint=$OUT/stage3" "$@"
echo "pipeline done: final model in $OUT/stage4 (aria-convert to-hf $OUT/stage4 OUT_HF)"
