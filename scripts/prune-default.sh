#!/usr/bin/env bash
# Set up (if needed) and run the main job: prune the embedded SmolLM2-135M by 10% (44:52:4), save the pruned
# model, a compensated one (closed-form refits of narrowed branches and of removed blocks, no training) and
# a LoRA-recovered one, measure each of them and the dense model on held-out text (WikiText-2 test, the
# first 8 windows of 2048 tokens: a couple of minutes per model), and write the report, which shows them
# side by side with the commands for the full numbers. Resumable: run it again after a kill. Extra
# arguments go to `multipruner prune`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
run=${RUN_DIR:-runs/smollm2-135m-10pct}
.venv/bin/multipruner prune --model smollm2-135m --output_path "$run" --weight_reorder \
  --target_ratio 10 --pruning_distribution 44:52:4 --mlp_channel_group_size 128 --attn_channel_group_size 192 \
  --extract --compensate --compensate-blocks --recover \
  --do-eval --eval-tasks wikitext2 --eval-max-windows 8 --resume "$@"
