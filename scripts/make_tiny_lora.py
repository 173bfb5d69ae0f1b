"""Write a tiny LoRA adapter (PEFT's on-disk format) for the model of make_tiny_model.py.

Usage (with the vLLM venv's python, which has torch and safetensors):

    .venv-vllm/bin/python scripts/make_tiny_lora.py MODEL_DIR OUT_DIR [SEED]

No download and no ``peft`` needed: the adapter is ``adapter_config.json`` plus
``adapter_model.safetensors`` with rank-8 ``lora_A``/``lora_B`` matrices for the q and v
projections of every layer, shaped from the model's ``config.json``. Different seeds give
different adapters (their outputs differ from the base's and each other's).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

RANK = 8


def make(model_dir: Path, out: Path, seed: int) -> None:
    cfg = json.loads((model_dir / "config.json").read_text())
    hidden = cfg["hidden_size"]
    head_dim = cfg.get("head_dim") or hidden // cfg["num_attention_heads"]
    outs = {"q_proj": cfg["num_attention_heads"] * head_dim,
            "v_proj": cfg.get("num_key_value_heads", cfg["num_attention_heads"]) * head_dim}
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(cfg["num_hidden_layers"]):
        for name, out_features in outs.items():
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{name}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(RANK, hidden, generator=gen) * 0.1
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(out_features, RANK,
                                                             generator=gen) * 0.1
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    (out / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": RANK, "lora_alpha": 2 * RANK,
        "lora_dropout": 0.0, "target_modules": list(outs), "bias": "none",
        "fan_in_fan_out": False, "modules_to_save": None, "inference_mode": True,
        "base_model_name_or_path": str(model_dir),
    }, indent=2))


if __name__ == "__main__":
    make(Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]) if len(sys.argv) > 3 else 0)
