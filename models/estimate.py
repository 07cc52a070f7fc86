"""Time and cost before training: the tokens pre-flight counted, a table of tokens per second on the job's GPU, and
the price of an hour of it.

The table (`benchmarks/results/throughput.json`, written by `benchmarks/throughput_table.py`) holds tokens per second
of training per (model, method, sequence length) on an L4, each entry saying where it comes from: `measured` (the
device and date, by `benchmarks/gpu_bench.py`) or `modelled`, the slower of two bounds: FLOPs per token (gpu_bench's
count, with gradient checkpointing's second forward pass) at an assumed share of the GPU's dense bf16 peak (MFU), and
the weights read per token at its memory bandwidth. A request takes the entry of its method nearest in parameters
and sequence length, scaled by the ratio of FLOPs per token, and the estimate names that entry and its source.

The price: `GPU_PRICE_PER_HOUR` (settings), else DEFAULT_PRICE_PER_HOUR, Cloud Run's list price for the job's
instance (one L4 without zonal redundancy, 8 vCPU and 32 GiB, instance-based billing, Tier 1 regions):
$0.0001867/s for the GPU, $0.000018 per vCPU-second and $0.000002 per GiB-second, $1.42 an hour in all.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

TABLE = Path(__file__).resolve().parent.parent / "benchmarks" / "results" / "throughput.json"
DEFAULT_PRICE_PER_HOUR = round((0.0001867 + 8 * 0.000018 + 32 * 0.000002) * 3600, 2)
# DPO reads each pair through the reference model as well (one more forward pass: 2 of LoRA's 4 FLOPs per token)
TRAINER_FACTOR = {"sft": 1.0, "dpo": 1.5, "orpo": 1.0, "simpo": 1.0}


def flops_per_token(total: int, trained: int, layers: int, seq: int, d_attn: int, method: str) -> float:
    """Training FLOPs per token: forward 2N, the checkpointed forward again 2N, backward through the base 2N (input
    gradients) and 2N more for the weights that train (all of them under Full), plus causal attention."""
    weight_grads = 2 * (total if method == "Full" else trained)
    return 6 * total + weight_grads + 6 * layers * seq * d_attn


def table() -> dict[str, Any]:
    return json.loads(TABLE.read_text())


def nearest(entries: list[dict[str, Any]], method: str, params: float, seq: int) -> dict[str, Any]:
    """The entry of `method` nearest in log parameters, then in sequence length."""
    mine = [e for e in entries if e["method"] == method]
    return min(mine, key=lambda e: (round(abs(math.log(e["params"] / params)), 3), abs(e["seq"] - seq)))


def estimate(cfg, stats: dict[str, Any], shape: dict[str, int], price_per_hour: float | None) -> dict[str, Any]:
    """The training time and cost of a request whose pre-flight counted `stats` (train_tokens, total_steps) on a
    model of `shape` (total and trained parameters, layers, attention width); what it used and how."""
    hp, kind = cfg.hyperparameters, cfg.trainer_type
    price = DEFAULT_PRICE_PER_HOUR if price_per_hour is None else price_per_hour
    found = table()
    out: dict[str, Any] = {"gpu": found["gpu"], "price_per_hour_usd": price,
                           "price_source": "GPU_PRICE_PER_HOUR" if price_per_hour is not None else
                           "default: Cloud Run, 1 L4 + 8 vCPU + 32 GiB, list price (models/estimate.py)"}
    if kind not in TRAINER_FACTOR:
        return out | {"seconds": None, "cost_usd": None,
                      "why": f"not estimated: {kind.upper()}'s time is its sampling's (generation), which the table "
                             "does not model"}
    rows, per_epoch = stats["train_rows"], stats["train_tokens"]
    steps = stats["total_steps"]
    epochs = hp.epochs if hp.max_steps <= 0 else steps * hp.effective_batch / max(rows, 1)
    tokens = per_epoch * epochs
    seq = min(hp.max_length, max(16, round(per_epoch / max(rows, 1))))  # the rows' mean length, as trained
    entry = nearest(found["entries"], cfg.method, shape["total"], seq)
    want = flops_per_token(shape["total"], shape["trained"], shape["layers"], seq, shape["d_attn"], cfg.method)
    rate = entry["tokens_per_s"] * entry["flops_per_token"] / want / TRAINER_FACTOR[kind]
    sizes = [e["params"] for e in found["entries"]]
    outside = not min(sizes) / 2 <= shape["total"] <= 2 * max(sizes)
    seconds = tokens / rate
    return out | {"tokens": round(tokens), "steps": steps, "mean_row_tokens": seq, "tokens_per_s": round(rate, 1),
                  "seconds": round(seconds), "cost_usd": round(seconds / 3600 * price, 4),
                  "table_entry": {k: entry[k] for k in ("model", "method", "seq", "tokens_per_s", "source")},
                  "why": f"{tokens:,.0f} tokens at {rate:,.0f} tokens/s: the table's {entry['model']} {entry['method']} "
                         f"at {entry['seq']} tokens ({entry['source'].split(':')[0]}), scaled by FLOPs per token"
                         + (f" from far outside the table's sizes ({shape['total']:,} parameters: an overhead-bound "
                            "model runs slower than this)" if outside else "")
                         + (", and DPO's reference pass" if kind == "dpo" else "") + "; training only (loading the "
                         "base and exporting are not counted)"}


def model_shape(model, method: str) -> dict[str, int]:
    """The counts the estimate needs from a model built on the meta device (models/memory.meta_model)."""
    from models.memory import text_config

    config = text_config(model.config)
    total = sum(p.numel() for p in model.parameters())
    # LoRA at rank r on every linear layer of a block trains about 2 r (d_in + d_out) per layer: small next to N
    trained = total if method == "Full" else total // 100
    # the attention's width from the first query projection of the language model: Gemma 4's head_dim differs
    # between its sliding and full layers, and its config refuses a global value
    d_attn = next((m.out_features for n, m in model.named_modules() if n.endswith("self_attn.q_proj")
                   and not any(t in n for t in ("vision", "audio"))), config.hidden_size)
    return {"total": total, "trained": trained, "layers": config.num_hidden_layers, "d_attn": d_attn}


def estimate_text(found: dict[str, Any]) -> str:
    """The estimate as --validate and `gemma-job submit --estimate` print it."""
    head = f"estimate on {found['gpu']} at ${found['price_per_hour_usd']:.2f}/h ({found['price_source']}): "
    if found.get("seconds") is None:
        return head + found["why"]
    minutes, seconds = divmod(found["seconds"], 60)
    hours, minutes = divmod(minutes, 60)
    took = f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds:02d}s"
    return head + (f"training about {took}, about ${found['cost_usd']:.2f}; {found['why']}; "
                   f"table entry: {found['table_entry']['source']}")
