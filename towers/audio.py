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
            self.net = nn.Sequential(  # (B, 1, M, T) -> (B, w, M/8, T/8)
                nn.Conv2d(1, w // 4, 3, stride=2, padding=1), nn.BatchNorm2d(w // 4), nn.GELU(),
                nn.Conv2d(w // 4, w // 2, 3, stride=2, padding=1), nn.BatchNorm2d(w // 2), nn.GELU(),
                nn.Conv2d(w // 2, w, 3, stride=2, padding=1), nn.BatchNorm2d(w), nn.GELU(),
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
        if waveforms.dim() != 2:
            raise ValueError(f"audio encoder expects waveforms of shape (B, N), got {tuple(waveforms.shape)}")
        min_len = self.cfg.sample_rate // 20  # 50 ms: shorter clips are zero-padded
        if waveforms.shape[1] < min_len:
            waveforms = torch.nn.functional.pad(waveforms, (0, min_len - waveforms.shape[1]))
        if self.cfg.arch == "wav2vec2":
            feats, out_lengths = self.model.extract_features(waveforms, lengths)
            h = feats[-1]  # (B, T', w)
            t = h.shape[1]
            mask = torch.arange(t, device=h.device)[None, :] < out_lengths.clamp(min=1)[:, None]  # (B, T')
        else:
            mel = torch.log(self.mel(waveforms) + 1e-6)  # (B, M, T)
            mel = (mel - mel.mean(dim=(1, 2), keepdim=True)) / (mel.std(dim=(1, 2), keepdim=True) + 1e-5)
            h = self.net(mel.unsqueeze(1)).mean(dim=2).transpose(1, 2)  # (B, T', w), averaged over mel bins
            frames = lengths // self.hop + 1
            t = h.shape[1]
            mask = torch.arange(t, device=h.device)[None, :] < (frames // 8 + 1).clamp(max=t)[:, None]
        mask = mask.unsqueeze(-1).to(h.dtype)
        return (h * mask).sum(1) / mask.sum(1).clamp(min=1.0)  # (B, w)
