"""Run by the consumer environment (.venv-consumer: the inference service's pinned peft 0.14.0 and
transformers 4.56.0), never by the job's: loads an exported folder the two ways the platform's inference
service does (gemma-facet/cloud-services inference/providers.py: `AutoModelForCausalLM.from_pretrained`
on the folder, which reads adapter_config.json through PEFT), plus `PeftModel.from_pretrained` on the base,
and writes the logits each gives for the same prompt. Several folders in one run: the consumer's libraries
are imported once.

    .venv-consumer/bin/python tests/consumer_load.py PROMPT FOLDER OUT.json [FOLDER OUT.json ...]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(folder: str, out: str, prompt: str) -> None:
    import peft
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(folder)
    tokenizer = AutoTokenizer.from_pretrained(path)
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                         tokenize=False, add_generation_prompt=True)
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids
    result = {"peft": peft.__version__, "transformers": transformers.__version__, "input_ids": ids[0].tolist(),
              "decoded": tokenizer.decode(ids[0], skip_special_tokens=True)}
    with torch.no_grad():
        auto = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32).eval()
        result["auto_logits"] = auto(ids).logits[0].tolist()
        if (path / "adapter_config.json").is_file():
            config = peft.PeftConfig.from_pretrained(path)
            base = AutoModelForCausalLM.from_pretrained(config.base_model_name_or_path, torch_dtype=torch.float32)
            model = peft.PeftModel.from_pretrained(base, path).eval()
            result["peft_logits"] = model(ids).logits[0].tolist()
            result["target_modules"] = sorted(config.target_modules)
            result["modules_to_save"] = sorted(config.modules_to_save or [])
    Path(out).write_text(json.dumps(result))


if __name__ == "__main__":
    prompt, pairs = sys.argv[1], sys.argv[2:]
    for folder, out in zip(pairs[::2], pairs[1::2]):
        main(folder, out, prompt)
