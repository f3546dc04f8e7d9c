"""The LLM backbone shared by both user-tower inputs: loading, truncation to the first N layers, and which of
its weights train (frozen, top-k layers, LoRA through peft, or full)."""

from __future__ import annotations

import warnings

from torch import nn

from configs import UserTowerConfig
from errors import ConfigError
from towers.hub import load_pretrained


def truncate(llm: nn.Module, layers: int) -> None:
    """Keep the first ``layers`` decoder layers and drop the final norm (the head normalises instead)."""
    blocks = getattr(llm, "layers", None)
    if not isinstance(blocks, nn.ModuleList) or not hasattr(llm, "norm"):
        raise ConfigError(f"user.layer is not supported for {type(llm).__name__} (no .layers/.norm)")
    if not 0 < layers <= len(blocks):
        raise ConfigError(f"user.layer={layers} but the LLM has {len(blocks)} layers")
    llm.layers = blocks[:layers]
    llm.config.num_hidden_layers = layers
    llm.norm = nn.Identity()


def build_decoder(cfg: UserTowerConfig, dropout: float = 0.0) -> nn.Module:
    """The decoder stack: the pretrained model's first ``cfg.layer`` layers, or a small random one."""
    from transformers import AutoConfig, AutoModel

    if cfg.init == "random":
        if cfg.random_hidden % 32 and cfg.random_hidden % 8:
            raise ConfigError(f"user.random_hidden={cfg.random_hidden} must be a multiple of 8")
        heads = max(1, cfg.random_hidden // 32)
        config = AutoConfig.for_model(
            "llama", vocab_size=1, hidden_size=cfg.random_hidden, intermediate_size=cfg.random_hidden * 4,
            num_hidden_layers=cfg.random_layers, num_attention_heads=heads, num_key_value_heads=heads,
            max_position_embeddings=max(512, cfg.max_len * 2), attention_dropout=dropout,
            bos_token_id=None, eos_token_id=None, pad_token_id=None,  # no vocabulary: inputs are item embeddings
        )
        llm = AutoModel.from_config(config)
    else:
        llm = load_pretrained(AutoModel, cfg.model, attention_dropout=dropout)
        if cfg.layer:
            truncate(llm, cfg.layer)
    if not isinstance(getattr(llm, "layers", None), nn.ModuleList):
        raise ConfigError(f"the user LLM needs a decoder with .layers; {type(llm).__name__} has none")
    return llm


def apply_strategy(llm: nn.Module, cfg: UserTowerConfig) -> nn.Module:
    """Set which LLM weights train; ``lora`` wraps the decoder with peft adapters (returned model)."""
    if cfg.strategy == "full":
        llm.requires_grad_(True)
        return llm
    llm.requires_grad_(False)
    if cfg.strategy == "top_k":
        if cfg.top_k > len(llm.layers):
            raise ConfigError(f"user.top_k={cfg.top_k} but the decoder has {len(llm.layers)} layers")
        for block in llm.layers[-cfg.top_k:]:
            block.requires_grad_(True)
    elif cfg.strategy == "lora":
        from peft import LoraConfig, get_peft_model

        targets = [t.strip() for t in cfg.lora_targets.split(",") if t.strip()]
        names = {name.rsplit(".", 1)[-1] for name, _ in llm.named_modules()}
        missing = [t for t in targets if t not in names]
        if missing:
            raise ConfigError(f"user.lora_targets: {missing} are not modules of {type(llm).__name__}")
        lora = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                          target_modules=targets, bias="none")
        with warnings.catch_warnings():  # peft asks transformers a deprecated question; not the user's concern
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            llm = get_peft_model(llm, lora)
    return llm
