"""Gemma 3n's image tower (timm's MobileNetV5, `mobilenetv5_300m_enc`, at its real width) on one 768x768 picture:
what the memory pre-flight counts for it (models/memory.py, GEMMA3N_TOWER_*). Random weights, on the CPU, in fp32;
the figures are given for bf16 (half), as the job runs the tower on a GPU.

    python benchmarks/gemma3n_tower_memory.py

- trains: the activations autograd keeps for the backward pass (each storage once, the weights not counted) when
  the tower trains (Full).
- frozen: the most the forward pass holds at once when it does not (LoRA on the language model): the largest sum of
  the tensors alive at one time, tracked through every module's output (a module's input and output both alive).
"""

from __future__ import annotations

import json


def main() -> None:
    import timm
    import torch

    model = timm.create_model("mobilenetv5_300m_enc", pretrained=False, num_classes=0)
    params = sum(p.numel() for p in model.parameters())
    picture = torch.rand(1, 3, 768, 768)
    kept: dict[int, int] = {}
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def pack(t):
        if t.untyped_storage().data_ptr() not in weights:  # activations, not the weights the backward reads
            kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(picture.requires_grad_(False)).sum().backward()
    sizes = []

    def record(module, args, output):
        if isinstance(output, torch.Tensor) and args and isinstance(args[0], torch.Tensor):
            sizes.append(args[0].nbytes + output.nbytes)

    hooks = [m.register_forward_hook(record) for m in model.modules() if not list(m.children())]
    with torch.no_grad():
        out = model(picture)
    for h in hooks:
        h.remove()
    print(json.dumps({"params": params, "output": list(out.shape),
                      "trains_bytes_bf16": sum(kept.values()) // 2, "frozen_bytes_bf16": max(sizes) // 2}))


if __name__ == "__main__":
    main()
