#!/usr/bin/env bash
# The GPU check of issue 12, run on a lent GPU machine in the project root (device tool: command
# "bash benchmarks/gpu_check.sh", carry [".gpu"]), after `bash ../shared/gpu/prepare.sh` filled .gpu/ here
# (a transformers wheel matching .venv, SmolLM2's tokenizer, a WikiText-2 validation slice, make_tiny.py).
#  1. the CLI on CUDA with a small random Llama: prune --extract, eval and bench with --device cuda;
#  2. search_speed.py --whole-run on a Llama-3.1-8B-shaped random model in bf16: the default exact
#     search, the same with candidates joined per layer (--layer-major-mb), fast racing, and one full
#     forward per candidate (at 8B the default 2 GiB head-bound budget
#     holds no block step's final states, so exact runs without the bound there).
# Dry run on CPU: DEV=cpu SHAPE=llama-tiny SEQLEN=64 TOKENS=512 DTYPE=float32 PY=.venv/bin/python SKIP_INSTALL=1
set -u
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
O=${OUT:-/tmp/out}; mkdir -p "$O"
PY=${PY:-python3} DEV=${DEV:-cuda} SHAPE=${SHAPE:-llama-8b} SEQLEN=${SEQLEN:-2048} TOKENS=${TOKENS:-16384}
DTYPE=${DTYPE:-bfloat16}
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || echo "no nvidia-smi"; } > "$O/env.txt" 2>&1
if [ -z "${SKIP_INSTALL:-}" ]; then
  # the machine has torch but no package registry: the carried wheel brings our transformers
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .gpu/whl/*.whl || exit 3
  export PYTHONPATH=/tmp/site:$PWD/src
fi
export MULTIPRUNER_TOKENIZER=.gpu/tok
$PY -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, 'cuda', torch.cuda.is_available())" >> "$O/env.txt" 2>&1
cat "$O/env.txt"
T=$(mktemp -d)
{
  set -x
  $PY .gpu/make_tiny.py "$T/tiny"
  $PY -c "import json,sys; open(sys.argv[2],'w').write('\n\n'.join(json.loads(l)['text'] for l in open(sys.argv[1])))" \
     .gpu/text.jsonl "$T/text.txt"
  time timeout 200 $PY -m multipruner.cli prune --model "$T/tiny" --output_path "$T/run" --target_ratio 10 \
     --pruning_distribution 30:50:20 --mlp_channel_group_size 128 --attn_channel_group_size 128 --seqlen 128 \
     --calibration .gpu/text.jsonl --device "$DEV" --dtype float32 --extract
  time timeout 120 $PY -m multipruner.cli eval --model "$T/run/model" --device "$DEV" --dtype auto \
     --tasks "$T/text.txt" --seqlen 512 --max-windows 8 --output "$O/eval.json"
  time timeout 120 $PY -m multipruner.cli bench --model "$T/run/model" --device "$DEV" --dtype auto \
     --repeats 3 --output "$O/bench.json"
  set +x
} > "$O/cli.log" 2>&1
grep -aE -A4 "Error|Traceback|pruning ratio|text perplexity|params \(M\)|^real" "$O/cli.log" | grep -av "it/s\]" | head -40
timeout "${SPEED_S:-400}" $PY benchmarks/search_speed.py --random-shape "$SHAPE" --tokenizer .gpu/tok \
   --calibration .gpu/text.jsonl --device "$DEV" --dtype "$DTYPE" --seqlen "$SEQLEN" --whole-run 2 \
   --whole-run-tokens "$TOKENS" --modes exact,exact-layermajor,fast,full > "$O/speed.log" 2>&1
echo "speed rc $?"
grep -v "Loading weights\|it/s" "$O/speed.log" | tail -20
