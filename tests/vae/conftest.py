"""Shared VAE test helpers."""

import pytest
import torch

from smartdiff.services.vae.model import dense_layout


@pytest.fixture
def cudnn_layouts(monkeypatch):
    """3D convolutions return their input's layout, as cuDNN's do. PyTorch's CPU conv3d returns NCDHW whatever
    its input, which would hide a layer that breaks the channels-last chain; the fixture makes the CPU keep it.
    (A no-op on CUDA tensors, where cuDNN does it itself.)"""
    conv = torch.nn.Conv3d._conv_forward

    def forward(self, x, weight, bias):
        y = conv(self, x, weight, bias)
        if not y.is_cuda and dense_layout(x) is torch.channels_last_3d:
            y = y.contiguous(memory_format=torch.channels_last_3d)
        return y

    monkeypatch.setattr(torch.nn.Conv3d, "_conv_forward", forward)
