"""Audio encoder: log-mel features (torchaudio) and a small conv net, or a torchaudio wav2vec2 model.

Waveforms arrive already decoded and resampled (see ``train.media``), padded to a common length, with their
true lengths; padding never leaks into the pooled feature.
"""

from __future__ import annotations

import torch
import torchaudio
from torch import nn

from configs import AudioEncoderConfig


class AudioEncoder(nn.Module):
    """Maps ``waveforms (B, N)`` at ``cfg.sample_rate`` plus ``lengths (B,)`` to features ``(B, width)``."""

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
                nn.Sequential(nn.Conv2d(chans[k], chans[k + 1], 3, stride=2, padding=1), nn.BatchNorm2d(chans[k + 1]),
                              nn.GELU())
                for k in range(3)
            )
        elif cfg.arch == "wav2vec2":
            self.model = torchaudio.models.wav2vec2_model(
                extractor_mode="group_norm",
                extractor_conv_layer_config=[(cfg.width, 10, 5)] + [(cfg.width, 3, 2)] * 4 + [(cfg.width, 2, 2)] * 2,
                extractor_conv_bias=False,
                encoder_embed_dim=cfg.width, encoder_projection_dropout=0.0, encoder_pos_conv_kernel=32,
                encoder_pos_conv_groups=4, encoder_num_layers=cfg.layers, encoder_num_heads=max(1, cfg.width // 32),
                encoder_attention_dropout=0.0, encoder_ff_interm_features=cfg.width * 2,
                encoder_ff_interm_dropout=0.0, encoder_dropout=0.0, encoder_layer_norm_first=False,
                encoder_layer_drop=0.0, aux_num_out=None,
            )
        else:
            raise ValueError(f"unknown audio arch {cfg.arch!r}; choose 'conv' or 'wav2vec2'")

    def forward(self, waveforms: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
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
        for block in self.blocks:
            x = block(x)
            frames = (frames + 1) // 2  # stride 2, padding 1, kernel 3
            x = x * (torch.arange(x.shape[-1], device=x.device)[None, :] < frames[:, None])[:, None, None, :]
        h = x.mean(dim=2)  # (B, w, T'), averaged over mel bins
        return h.sum(-1) / frames[:, None].to(h.dtype)  # (B, w): mean over real frames only
