"""Load a directory written by multipruner with stock transformers only, and chat with it.

    multipruner extract --model smollm2-135m --plan examples/smollm2-hand-plan.json \
        --output smol-hand --weight-reorder
    .venv/bin/python examples/chat_with_stock_transformers.py smol-hand "What is the capital of France?"

No multipruner import: the model class comes from the modeling file saved next to the weights
(trust_remote_code=True); generation uses the KV cache.
"""

import sys

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer


def main() -> None:
    directory = sys.argv[1]
    question = sys.argv[2] if len(sys.argv) > 2 else "What is the capital of France?"
    tokenizer = AutoTokenizer.from_pretrained(directory)
    model = AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=True, dtype=torch.float32)
    params = sum(p.numel() for p in model.parameters())
    print(f"transformers {transformers.__version__}: {type(model).__name__}, {params:,} parameters")
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    output = model.generate(**prompt, max_new_tokens=40, do_sample=False)
    answer = tokenizer.decode(output[0, prompt["input_ids"].shape[1] :], skip_special_tokens=True)
    print(repr(answer))


if __name__ == "__main__":
    main()
