"""The table the cost estimate reads (models/estimate.py): tokens per second of training on an NVIDIA L4 per (Gemma 3
size, method, sequence length), modelled until benchmarks/gpu_bench.py measures them on the GPU.

A modelled entry is the slower of two bounds:
  compute    FLOPs per token (models/estimate.flops_per_token) at MFU of the L4's dense bf16 peak (121 TFLOPS):
             0.35 for LoRA and Full, 0.25 for QLoRA (each 4-bit weight is dequantized on every use);
  bandwidth  the weights each token's micro-batch reads (forward, checkpointed forward, backward: 3 passes, 2 bytes a
             weight, 0.56 in NF4; Full's 8-bit AdamW reads and writes 16 bytes a parameter per optimizer step) at the
             L4's 300 GB/s, with the request's default batch (2 rows, 4 accumulated).
The MFUs are assumptions, stated here, until a measurement replaces them: a measured entry carries `measured on
<device>, <date>` in its source (gpu_bench's tokens/s, projected to the L4 by the ratio of peaks where it ran on
another GPU).

    python benchmarks/throughput_table.py            # writes benchmarks/results/throughput.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PEAK_TFLOPS, BANDWIDTH = 121.0, 300e9
MFU = {"LoRA": 0.35, "QLoRA": 0.25, "Full": 0.35}
WEIGHT_BYTES = {"LoRA": 2.0, "QLoRA": 0.56, "Full": 2.0}
SEQS = (512, 1024, 2048)
BATCH, ACCUMULATION = 2, 4


def entries() -> list[dict]:
    from models.estimate import flops_per_token
    from models.memory import gemma3_shapes, text_config

    out = []
    for name, config, total, _ in gemma3_shapes():
        text = text_config(config)
        d_attn = text.num_attention_heads * text.head_dim
        for method in ("LoRA", "QLoRA", "Full"):
            trained = total if method == "Full" else total // 100
            for seq in SEQS:
                fpt = flops_per_token(total, trained, text.num_hidden_layers, seq, d_attn, method)
                compute = MFU[method] * PEAK_TFLOPS * 1e12 / fpt
                per_token = 3 * WEIGHT_BYTES[method] * total / (BATCH * seq)
                if method == "Full":
                    per_token += 16 * total / (BATCH * ACCUMULATION * seq)
                bandwidth = BANDWIDTH / per_token
                bound = "compute" if compute <= bandwidth else "bandwidth"
                out.append({"model": name, "params": total, "method": method, "seq": seq,
                            "flops_per_token": fpt, "tokens_per_s": round(min(compute, bandwidth), 1),
                            "source": f"modelled: {bound}-bound (MFU {MFU[method]} of 121 TFLOPS, 300 GB/s)"})
    return out


def main() -> None:
    table = {"gpu": "NVIDIA L4", "batch": BATCH, "gradient_accumulation_steps": ACCUMULATION, "entries": entries()}
    path = ROOT / "benchmarks" / "results" / "throughput.json"
    path.write_text(json.dumps(table, indent=1) + "\n")
    print(f"wrote {path}: {len(table['entries'])} entries")


if __name__ == "__main__":
    main()
