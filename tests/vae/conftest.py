"""Shared VAE test helpers."""

import pytest
import torch

from smartdiff.services.vae.model import dense_layout


def _layout_name(x: torch.Tensor) -> str:
    if x.dim() == 5:
        return {torch.channels_last_3d: "channels_last", torch.contiguous_format: "ncdhw"}.get(dense_layout(x),
                                                                                               "strided")
    if x.stride(1) == 1 and x.is_contiguous(memory_format=torch.channels_last):
        return "nhwc"
    return "nchw" if x.is_contiguous() else "strided"


@pytest.fixture
def cudnn_layouts(monkeypatch) -> list[str]:
    """Every 2D / 3D convolution's actual input layout, recorded in call order ('channels_last' / 'ncdhw' for 5D,
    'nhwc' / 'nchw' for 4D, 'strided' for neither), and 3D convolutions returning channels-last when their input
    or weight is, as cuDNN's do. PyTorch's CPU conv3d returns NCDHW whatever its input, which would hide a layer
    that breaks the channels-last chain; here the CPU keeps it. (CUDA tensors: cuDNN does it itself.)"""
    seen: list[str] = []
    conv3d, conv2d = torch.nn.Conv3d._conv_forward, torch.nn.Conv2d._conv_forward

    def forward3d(self, x, weight, bias):
        seen.append(_layout_name(x))
        y = conv3d(self, x, weight, bias)
        cl = dense_layout(x) is torch.channels_last_3d or (
            weight.stride(1) == 1 and weight.shape[1] > 1 and weight.shape[2:].numel() > 1)
        if not y.is_cuda and cl:
            y = y.contiguous(memory_format=torch.channels_last_3d)
        return y

    def forward2d(self, x, weight, bias):
        seen.append(_layout_name(x))
        return conv2d(self, x, weight, bias)

    monkeypatch.setattr(torch.nn.Conv3d, "_conv_forward", forward3d)
    monkeypatch.setattr(torch.nn.Conv2d, "_conv_forward", forward2d)
    return seen
