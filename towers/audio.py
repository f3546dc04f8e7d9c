"""Audio encoder: log-mel features (torchaudio) and a small conv net, or a torchaudio wav2vec2 model.

Waveforms arrive already decoded and resampled (see ``data.media``), padded to a common length, with their
true lengths; padding never leaks into the pooled feature, nor into the batch-norm statistics of the conv net.

The wav2vec2 arch is either a small randomly initialised model (``width``, ``layers``) or a pretrained
``torchaudio.pipelines`` bundle (``pretrained: WAV2VEC2_BASE``), whose weights torch.hub downloads on first use.
"""

from __future__ import annotations

import logging
import pickle

import torch
import torchaudio
from torch import nn

from configs import AudioEncoderConfig
from errors import ConfigError, ModelLoadError

logger = logging.getLogger(__name__)


class MaskedBatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` over ``(B, C, M, T)`` whose batch statistics cover only the valid time frames.

    Short clips are zero-padded to the longest clip of the batch; plain batch norm would count those frames
    in its mean and variance, so a clip's training features (and the running statistics used at inference)
    would depend on how much padding its batch happened to need. The parameters and buffers are those of
    ``nn.BatchNorm2d``, so checkpoints keep their keys; in eval mode, or without a mask, it is exactly
    ``nn.BatchNorm2d``.
    """

    def forward(self, x: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        """Normalise ``x (B, C, M, T)``; ``valid (B, T)`` marks the real frames (padded ones are ignored)."""
        use_batch_stats = self.training or self.running_mean is None
        if valid is None or not use_batch_stats:
            return super().forward(x)
        w = valid[:, None, None, :].to(x.dtype)  # (B, 1, 1, T)
        n = w.sum() * x.shape[2]  # valid values per channel
        if n <= 1:
            raise ValueError(f"MaskedBatchNorm2d needs more than one valid value per channel, got {int(n)}")
        mean = (x * w).sum((0, 2, 3)) / n  # (C,)
        centred = x - mean[None, :, None, None]
        var = (centred.square() * w).sum((0, 2, 3)) / n  # (C,), biased: what batch norm normalises with
        if self.training and self.track_running_stats:
            self.num_batches_tracked.add_(1)
            momentum = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
            with torch.no_grad():  # as F.batch_norm: the running variance is the unbiased one
                self.running_mean.lerp_(mean.detach(), momentum)
                self.running_var.lerp_(var.detach() * n / (n - 1), momentum)
        y = centred * torch.rsqrt(var + self.eps)[None, :, None, None]
        if self.affine:
            y = y * self.weight[None, :, None, None] + self.bias[None, :, None, None]
        return y


def wav2vec2_bundles() -> list[str]:
    """Names of the ``torchaudio.pipelines`` wav2vec2-family bundles (wav2vec2, HuBERT, WavLM, ...)."""
    import torchaudio.pipelines as pipelines

    return sorted(n for n in dir(pipelines) if isinstance(getattr(pipelines, n), pipelines.Wav2Vec2Bundle))


def load_wav2vec2_bundle(name: str, sample_rate: int) -> nn.Module:
    """The pretrained model of the ``torchaudio.pipelines`` bundle ``name``.

    Raises :class:`ConfigError` for an unknown bundle or a ``sample_rate`` other than the bundle's (waveforms
    are decoded at the config's rate, so it must be the rate the model was trained on), and one
    :class:`ModelLoadError` naming the bundle when its weights cannot be fetched or read (offline, say).
    """
    import torchaudio.pipelines as pipelines

    bundle = getattr(pipelines, name, None)
    if not isinstance(bundle, pipelines.Wav2Vec2Bundle):
        raise ConfigError(f"item.audio.pretrained: unknown torchaudio bundle {name!r}; "
                          f"choose one of {wav2vec2_bundles()}")
    if int(bundle.sample_rate) != sample_rate:
        raise ConfigError(f"item.audio.sample_rate: {sample_rate} Hz, but the {name} bundle was trained at "
                          f"{int(bundle.sample_rate)} Hz; set item.audio.sample_rate={int(bundle.sample_rate)}")
    try:
        model = bundle.get_model()
    # Download failures are URLError/HTTPError (OSError); a truncated or corrupt cached file fails in torch.load.
    except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as err:
        raise ModelLoadError(
            f"cannot load the torchaudio bundle {name!r} for the audio encoder ({type(err).__name__}: {err}); its "
            f"weights are downloaded once into {torch.hub.get_dir()}, so run once with network access, or set "
            f"item.audio.pretrained='' for a randomly initialised encoder"
        ) from err
    logger.info("loaded the pretrained audio encoder %s", name)
    return model


def _wav2vec2_dim(model: nn.Module) -> int:
    """Feature width of a (possibly wrapped) torchaudio wav2vec2-family model."""
    inner = getattr(model, "model", model)  # bundles that normalise the waveform wrap the model
    return int(inner.encoder.feature_projection.projection.out_features)


class AudioEncoder(nn.Module):
    """Maps ``waveforms (B, N)`` at ``cfg.sample_rate`` plus ``lengths (B,)`` to features ``(B, feature_dim)``."""

    def __init__(self, cfg: AudioEncoderConfig):
        super().__init__()
        self.cfg = cfg
        self.feature_dim = cfg.width
        if cfg.arch == "conv":
            self.hop = cfg.sample_rate // 100  # 10 ms frames
            self.mel = torchaudio.transforms.MelSpectrogram(
                sample_rate=cfg.sample_rate, n_fft=cfg.sample_rate // 40, hop_length=self.hop, n_mels=cfg.n_mels
            )
            w = cfg.width
            chans = [1, w // 4, w // 2, w]
            self.blocks = nn.ModuleList(  # each halves mel bins and frames: (B, c, M, T) -> (B, c', M/2, T/2)
                nn.Sequential(nn.Conv2d(chans[k], chans[k + 1], 3, stride=2, padding=1),
                              MaskedBatchNorm2d(chans[k + 1]), nn.GELU())
                for k in range(3)
            )
        elif cfg.arch == "wav2vec2" and cfg.pretrained:
            self.model = load_wav2vec2_bundle(cfg.pretrained, cfg.sample_rate)
            self.feature_dim = _wav2vec2_dim(self.model)
        elif cfg.arch == "wav2vec2":
            heads = max(1, cfg.width // 32)
            if cfg.width % 4 or cfg.width % heads:  # 4 positional-conv groups; heads must split the width
                raise ConfigError(f"item.audio.width: the wav2vec2 arch needs a multiple of 4 divisible by its "
                                  f"{heads} attention heads (width // 32), got {cfg.width}")
            self.model = torchaudio.models.wav2vec2_model(
                extractor_mode="group_norm",
                extractor_conv_layer_config=[(cfg.width, 10, 5)] + [(cfg.width, 3, 2)] * 4 + [(cfg.width, 2, 2)] * 2,
                extractor_conv_bias=False,
                encoder_embed_dim=cfg.width, encoder_projection_dropout=0.0, encoder_pos_conv_kernel=32,
                encoder_pos_conv_groups=4, encoder_num_layers=cfg.layers, encoder_num_heads=heads,
                encoder_attention_dropout=0.0, encoder_ff_interm_features=cfg.width * 2,
                encoder_ff_interm_dropout=0.0, encoder_dropout=0.0, encoder_layer_norm_first=False,
                encoder_layer_drop=0.0, aux_num_out=None,
            )
        else:
            raise ValueError(f"unknown audio arch {cfg.arch!r}; choose 'conv' or 'wav2vec2'")
        if not cfg.trainable:
            self.requires_grad_(False)
            self.train(False)

    def train(self, mode: bool = True) -> AudioEncoder:
        """As ``nn.Module.train``, except that a frozen encoder (``trainable: false``) always stays in eval mode:
        dropout, layer drop and batch-norm updates would only add noise to features that cannot adapt."""
        return super().train(mode and self.cfg.trainable)

    def forward(self, waveforms: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Features ``(B, feature_dim)`` of the ``lengths[i]`` first samples of each row of ``waveforms``."""
        if waveforms.dim() != 2 or lengths.shape != (waveforms.shape[0],):
            raise ValueError(f"audio encoder expects waveforms (B, N) and lengths (B,), got {tuple(waveforms.shape)}, "
                             f"{tuple(lengths.shape)}")
        min_len = self.cfg.sample_rate // 20  # 50 ms: shorter clips are zero-padded
        clips = [waveforms[i, : max(int(n), 1)] for i, n in enumerate(lengths)]
        clips = [torch.nn.functional.pad(c, (0, min_len - c.numel())) if c.numel() < min_len else c for c in clips]
        if self.cfg.arch == "wav2vec2":
            # One clip at a time: the group-norm feature extractor would otherwise normalise over the padding.
            return torch.cat([self.model.extract_features(c[None])[0][-1].mean(1) for c in clips])  # (B, w)
        # Log-mels per clip (STFT edges and normalisation see only the real signal), then padded to a batch.
        mels = []
        for c in clips:
            m = torch.log(self.mel(c) + 1e-6)  # (M, T)
            mels.append((m - m.mean()) / (m.std() + 1e-5))
        frames = torch.tensor([m.shape[1] for m in mels], device=waveforms.device)
        x = torch.zeros(len(mels), 1, self.cfg.n_mels, int(frames.max()), device=waveforms.device)
        for i, m in enumerate(mels):
            x[i, 0, :, : m.shape[1]] = m
        for conv, norm, act in self.blocks:
            x = conv(x)
            frames = (frames + 1) // 2  # stride 2, padding 1, kernel 3
            valid = torch.arange(x.shape[-1], device=x.device)[None, :] < frames[:, None]  # (B, T')
            # Padded frames are zeroed after every block, so the next conv sees the zeros a lone clip's own
            # padding would give it, and are left out of the batch-norm statistics.
            x = act(norm(x, valid)) * valid[:, None, None, :]
        h = x.mean(dim=2)  # (B, w, T'), averaged over mel bins
        return h.sum(-1) / frames[:, None].to(h.dtype)  # (B, w): mean over real frames only
