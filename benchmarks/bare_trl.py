"""The baseline: the same tiny job as a bare TRL script (no job state, no checks, no manifest).

    python benchmarks/bare_trl.py REQUEST.json LOCAL_DIR OUT_DIR
"""

import json
import sys
from pathlib import Path

from datasets import load_dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import SFTConfig, SFTTrainer

request, local_dir, out = json.loads(Path(sys.argv[1]).read_text()), Path(sys.argv[2]), sys.argv[3]
tc = request["training_config"]
hp = tc["hyperparameters"]
folder = local_dir / "gemma-dataset-bucket" / "processed_datasets" / request["processed_dataset_id"]
data = load_dataset("parquet", data_files={"train": str(folder / "train.parquet"), "test": str(folder / "test.parquet")})
tok = AutoTokenizer.from_pretrained(tc["base_model_id"])
model = AutoModelForCausalLM.from_pretrained(tc["base_model_id"], dtype="float32")
args = SFTConfig(output_dir=out, per_device_train_batch_size=hp["batch_size"], per_device_eval_batch_size=hp["batch_size"],
                 gradient_accumulation_steps=hp["gradient_accumulation_steps"], num_train_epochs=hp["epochs"],
                 learning_rate=hp["learning_rate"], max_length=hp["max_length"], logging_steps=hp["logging_steps"],
                 eval_strategy="epoch", save_strategy="epoch", report_to=[], use_cpu=True, bf16=False,
                 gradient_checkpointing=False, max_grad_norm=hp["max_grad_norm"], disable_tqdm=True)
lora = LoraConfig(r=hp["lora_rank"], lora_alpha=hp["lora_alpha"], lora_dropout=hp["lora_dropout"],
                  target_modules="all-linear", task_type="CAUSAL_LM")
trainer = SFTTrainer(model=model, args=args, train_dataset=data["train"], eval_dataset=data["test"],
                     processing_class=tok, peft_config=lora)
trainer.train()
print(json.dumps({**trainer.evaluate(), "global_step": trainer.state.global_step}))
trainer.model.save_pretrained(f"{out}/adapter")
tok.save_pretrained(f"{out}/adapter")
