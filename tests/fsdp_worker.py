"""Run by tests/test_distributed.py under torchrun (2 processes, gloo): the FSDP2 path the job configures
for a LoRA that does not fit one GPU (distributed.trainer_args: `fully_shard` on each decoder layer, a full
state dict for the final save), as far as it runs on a CPU, which the Trainer's FSDP does not.

The tiny Gemma 3 with the job's LoRA (PEFT) is sharded over both processes and trained a few steps; the
full state dict is gathered (torch.distributed.checkpoint's get_model_state_dict, full_state_dict and
cpu_offload, as accelerate gathers it for FULL_STATE_DICT); rank 0 saves it as a PEFT adapter, loads it on
the base, merges it, and writes to OUT the largest logit difference between the merged model and the sharded
one on the same input, with the step losses.

    torchrun --nproc_per_node 2 tests/fsdp_worker.py BASE_MODEL OUT_JSON
"""

from __future__ import annotations

import json
import sys
import tempfile

import torch
import torch.distributed as dist
from peft import LoraConfig, PeftModel, get_peft_model
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import fully_shard
from transformers import AutoModelForCausalLM


def main(base: str, out: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    lora = LoraConfig(task_type="CAUSAL_LM", r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"])
    model = get_peft_model(model, lora)
    layer_cls = type(model.base_model.model.model.layers[0])
    assert layer_cls.__name__ == "Gemma3DecoderLayer"  # what trainer_args names for the auto wrap
    for module in model.modules():
        if isinstance(module, layer_cls):
            fully_shard(module)
    fully_shard(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05)
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(3, model.config.vocab_size, (4, 12), generator=generator)
    losses = []
    for _ in range(4):  # the same rows on both ranks: the sharded forward is every process's
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    with torch.no_grad():
        sharded_logits = model(input_ids=ids).logits.float()
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        plain = get_peft_model(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), lora)
        missing, unexpected = plain.load_state_dict(full, strict=False)
        lora_missing = [k for k in missing if "lora_" in k]
        with tempfile.TemporaryDirectory() as folder:
            plain.save_pretrained(folder)
            merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
                                               folder).merge_and_unload()
            with torch.no_grad():
                merged_logits = merged(input_ids=ids).logits.float()
        trained = [k for k, v in full.items() if "lora_B" in k and v.abs().sum() > 0]
        json.dump({"losses": losses, "max_logit_diff": (merged_logits - sharded_logits).abs().max().item(),
                   "lora_missing": lora_missing, "unexpected": list(unexpected), "lora_b_trained": len(trained),
                   "keys": len(full)}, open(out, "w"))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
