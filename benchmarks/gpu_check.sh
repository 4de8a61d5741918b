#!/usr/bin/env bash
# The GPU check: what this project can only measure on a GPU, in one script that fits a short lease.
#  1. the CLI on CUDA with a small random Llama: prune --extract, eval and bench with --device cuda;
#  2. search_speed.py --whole-run on a Llama-3.1-8B-shaped random model in bf16: the default exact
#     search, the same with candidates joined per layer (--layer-major-mb), fast racing, and one full
#     forward per candidate (at 8B the default 2 GiB head-bound budget holds no block step's final
#     states, so exact runs without the bound there).
#
# A GPU machine may have torch but no package registry and none of this project's data, so the check
# runs from an assets folder made here first (ASSETS, default runs/gpu-check, git-ignored):
#
#   bash benchmarks/gpu_check.sh prepare [ASSETS]   # here, after `bash scripts/setup.sh`: ~17 MB
#   bash benchmarks/gpu_check.sh [ASSETS]           # on the GPU machine, in the project root
#
# "prepare" writes ASSETS/whl (the transformers wheel matching .venv, downloaded with pip),
# ASSETS/tok (SmolLM2's tokenizer, from the embedded model) and ASSETS/text.jsonl (the first 600 rows
# of over 200 characters of WikiText-2 *validation*, read as `--calibration wikitext2` reads it; set
# MULTIPRUNER_DATA_DIR if no offline data folder is found). With the device tool: command
# "bash benchmarks/gpu_check.sh", carry ["runs/gpu-check"]. Results go to $OUT (default /tmp/out).
# Dry run on CPU: DEV=cpu SHAPE=llama-tiny SEQLEN=64 TOKENS=512 DTYPE=float32 PY=.venv/bin/python SKIP_INSTALL=1
set -u
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
cd "$(dirname "$0")/.."

if [ "${1:-}" = "prepare" ]; then
  A=${2:-runs/gpu-check}
  [ -x .venv/bin/python ] || { echo "gpu_check.sh: no .venv here; run bash scripts/setup.sh first" >&2; exit 2; }
  set -e
  rm -rf "$A" && mkdir -p "$A/whl"
  v=$(.venv/bin/python -c "import transformers; print(transformers.__version__)")
  .venv/bin/python -m pip download -q --no-deps -d "$A/whl" "transformers==$v"
  .venv/bin/python - "$A" <<'PY'
import json, sys
from multipruner.data import load_texts
from multipruner.models import load_model

assets = sys.argv[1]
_, tokenizer = load_model("smollm2-135m")
tokenizer.save_pretrained(f"{assets}/tok")
rows = [r for r in load_texts("wikitext2", split="validation") if len(r.strip()) > 200][:600]
with open(f"{assets}/text.jsonl", "w", encoding="utf-8") as f:
    f.writelines(json.dumps({"text": r.strip()}) + "\n" for r in rows)
PY
  du -sh "$A"
  exit 0
fi

A=${1:-runs/gpu-check}
needed=("$A/tok" "$A/text.jsonl")
[ -n "${SKIP_INSTALL:-}" ] || needed+=("$A/whl")
for path in "${needed[@]}"; do
  if [ ! -e "$path" ]; then
    echo "gpu_check.sh: $path is missing; run 'bash benchmarks/gpu_check.sh prepare $A' on a machine with" \
      "the project's .venv first, and carry $A to this one" >&2
    exit 2
  fi
done

O=${OUT:-/tmp/out}; mkdir -p "$O"
PY=${PY:-python3} DEV=${DEV:-cuda} SHAPE=${SHAPE:-llama-8b} SEQLEN=${SEQLEN:-2048} TOKENS=${TOKENS:-16384}
DTYPE=${DTYPE:-bfloat16}
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || echo "no nvidia-smi"; } > "$O/env.txt" 2>&1
if [ -z "${SKIP_INSTALL:-}" ]; then
  # the machine has torch but no package registry: the carried wheel brings our transformers
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site "$A"/whl/*.whl || exit 3
  export PYTHONPATH=/tmp/site:$PWD/src
fi
$PY -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, 'cuda', torch.cuda.is_available())" >> "$O/env.txt" 2>&1
cat "$O/env.txt"
T=$(mktemp -d)
{
  set -x
  # a small random Llama (GQA) with SmolLM2's tokenizer, saved as a Hugging Face directory
  $PY - "$T/tiny" "$A/tok" <<'PY'
import sys, torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
out, tokenizer = sys.argv[1], sys.argv[2]
torch.manual_seed(0)
config = LlamaConfig(hidden_size=256, intermediate_size=768, num_hidden_layers=8, num_attention_heads=8,
                     num_key_value_heads=2, head_dim=32, vocab_size=49152, max_position_embeddings=4096,
                     bos_token_id=1, eos_token_id=2, pad_token_id=2, tie_word_embeddings=True)
LlamaForCausalLM(config).save_pretrained(out)
AutoTokenizer.from_pretrained(tokenizer).save_pretrained(out)
PY
  $PY -c "import json,sys; open(sys.argv[2],'w').write('\n\n'.join(json.loads(l)['text'] for l in open(sys.argv[1])))" \
     "$A/text.jsonl" "$T/text.txt"
  time timeout 200 $PY -m multipruner.cli prune --model "$T/tiny" --output_path "$T/run" --target_ratio 10 \
     --pruning_distribution 30:50:20 --mlp_channel_group_size 128 --attn_channel_group_size 128 --seqlen 128 \
     --calibration "$A/text.jsonl" --device "$DEV" --dtype float32 --extract
  time timeout 120 $PY -m multipruner.cli eval --model "$T/run/model" --device "$DEV" --dtype auto \
     --tasks "$T/text.txt" --seqlen 512 --max-windows 8 --output "$O/eval.json"
  time timeout 120 $PY -m multipruner.cli bench --model "$T/run/model" --device "$DEV" --dtype auto \
     --repeats 3 --output "$O/bench.json"
  set +x
} > "$O/cli.log" 2>&1
grep -aE -A4 "Error|Traceback|pruning ratio|text perplexity|params \(M\)|^real" "$O/cli.log" | grep -av "it/s\]" | head -40
timeout "${SPEED_S:-400}" $PY benchmarks/search_speed.py --random-shape "$SHAPE" --tokenizer "$A/tok" \
   --calibration "$A/text.jsonl" --device "$DEV" --dtype "$DTYPE" --seqlen "$SEQLEN" --whole-run 2 \
   --whole-run-tokens "$TOKENS" --modes exact,exact-layermajor,fast,full > "$O/speed.log" 2>&1
echo "speed rc $?"
grep -v "Loading weights\|it/s" "$O/speed.log" | tail -20
