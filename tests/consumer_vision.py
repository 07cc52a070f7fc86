"""Run by the consumer environment (.venv-consumer: the inference service's pinned peft 0.14.0 and
transformers 4.56.0), never by the job's: loads an image+text export the way the platform's inference
service does for vision (gemma-facet/cloud-services inference/providers.py: `AutoModelForImageTextToText`
on the folder, the processor from the base model id), plus `PeftModel.from_pretrained` on the base for an
adapter, and writes the logits each gives for one prompt with its picture.

    .venv-consumer/bin/python tests/consumer_vision.py BASE IMAGE MESSAGES_JSON FOLDER OUT.json [FOLDER OUT.json ...]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(base_dir: str, image_path: str, messages: list, folder: str, out: str) -> None:
    import peft
    import torch
    import transformers
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(base_dir)
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    image = Image.open(image_path).convert("RGB")
    inputs = processor(text=[text], images=[[image]], return_tensors="pt", add_special_tokens=False)
    result = {"peft": peft.__version__, "transformers": transformers.__version__,
              "input_ids": inputs["input_ids"][0].tolist()}
    with torch.no_grad():
        auto = AutoModelForImageTextToText.from_pretrained(folder, torch_dtype=torch.float32).eval()
        result["auto_logits"] = auto(**inputs).logits[0].tolist()
        if (Path(folder) / "adapter_config.json").is_file():
            base = AutoModelForImageTextToText.from_pretrained(base_dir, torch_dtype=torch.float32)
            result["peft_logits"] = peft.PeftModel.from_pretrained(base, folder).eval()(**inputs).logits[0].tolist()
    Path(out).write_text(json.dumps(result))


if __name__ == "__main__":
    base, image, messages, pairs = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), sys.argv[4:]
    for folder, out in zip(pairs[::2], pairs[1::2]):
        main(base, image, messages, folder, out)
