"""Writes tests/service/data/saelens: one SAE folder per architecture, saved by SAELens itself,
with decoded.npz holding codes and SAELens's own `decode` of them (the ground truth)."""

import json
import os
import shutil
from pathlib import Path

import numpy as np
import torch
from sae_lens import SAE, GatedSAEConfig, JumpReLUSAEConfig, StandardSAEConfig, TopKSAEConfig

root = "tests/service/data/saelens"
shutil.rmtree(root, ignore_errors=True)
torch.manual_seed(0)
cases = [
    ("standard", StandardSAEConfig, {}, "float32"),
    ("topk", TopKSAEConfig, {"k": 4}, "float32"),
    ("jumprelu", JumpReLUSAEConfig, {}, "float32"),
    ("gated", GatedSAEConfig, {}, "float32"),
    ("topk-bfloat16", TopKSAEConfig, {"k": 4}, "bfloat16"),
    ("standard-float16", StandardSAEConfig, {}, "float16"),
]
for name, cls, extra, dtype in cases:
    cfg = cls(d_in=8, d_sae=16, dtype=dtype, device="cpu", **extra)
    d = cfg.to_dict()
    d["metadata"].update(model_name="gpt2", hook_name="blocks.0.hook_resid_pre")
    sae = SAE.from_dict(d)
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn_like(p))
    out = f"{root}/{name}"
    sae.save_model(out)
    codes = torch.relu(torch.randn(5, 16, dtype=sae.W_dec.dtype))
    with torch.no_grad():
        decoded = sae.decode(codes)
    np.savez(f"{out}/decoded.npz", codes=codes.float().numpy(), decoded=decoded.float().numpy())
    print(
        name,
        os.path.getsize(f"{out}/sae_weights.safetensors"),
        json.loads(Path(f"{out}/cfg.json").read_text())["dtype"],
    )
