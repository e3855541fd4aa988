"""PyTorch reference trunks under torchvision's key names (torchvision itself does not
install here): ResNet-18/34/50/101 with torchvision's ``replace_stride_with_dilation``
schedule, written from torchvision's documented architecture."""

from __future__ import annotations

import torch
from torch import nn

# One intra-op thread: the suite runs one xdist worker per core, and torch's default (a
# thread per core in every worker) oversubscribes them.
torch.set_num_threads(1)


class BasicBlock(nn.Module):
    """torchvision's BasicBlock; dilated as DeepLab's ``ResnetDilated`` (torchvision's
    refuses dilation here): the first block's formerly strided conv1 gets
    ``first_dilation``, every other 3x3 conv the stage's ``dilation``."""

    expansion = 1

    def __init__(
        self, inplanes, planes, stride=1, downsample=None, dilation=1, first_dilation=None
    ):
        super().__init__()
        d1 = dilation if first_dilation is None else first_dilation
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, d1, d1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, dilation, dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        return torch.relu(out + identity)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(
        self, inplanes, planes, stride=1, downsample=None, dilation=1, first_dilation=None
    ):
        super().__init__()
        d2 = (
            dilation if first_dilation is None else first_dilation
        )  # torchvision: previous_dilation
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, d2, d2, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.downsample = downsample

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        out = torch.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        identity = x if self.downsample is None else self.downsample(x)
        return torch.relu(out + identity)


class ResNet(nn.Module):
    """torchvision.models.ResNet's trunk and classifier; ``dilated``: stages 3 and 4 with
    ``replace_stride_with_dilation=[False, True, True]`` (DeepLab's output stride 8)."""

    def __init__(self, depth=50, base_width=64, stage_sizes=None, dilated=False, classes=10):
        super().__init__()
        block = BasicBlock if depth < 50 else Bottleneck
        sizes = (
            stage_sizes
            or {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}[depth]
        )
        self.inplanes, self.dilation = base_width, 1
        self.conv1 = nn.Conv2d(3, base_width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(base_width)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        dilate = (False, False, dilated, dilated)
        for i, n in enumerate(sizes):
            stride = 1 if i == 0 else 2
            setattr(
                self,
                f"layer{i + 1}",
                self._make_layer(block, base_width * 2**i, n, stride, dilate[i]),
            )
        self.fc = nn.Linear(base_width * 8 * block.expansion, classes)

    def _make_layer(self, block, planes, blocks, stride, dilate):
        previous_dilation = self.dilation
        if dilate:
            self.dilation *= stride
            stride = 1
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride, bias=False),
                nn.BatchNorm2d(planes * block.expansion),
            )
        layers = [
            block(self.inplanes, planes, stride, downsample, self.dilation, previous_dilation)
        ]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes, dilation=self.dilation) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def trunk(self, x):
        x = self.maxpool(torch.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


def randomise(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random weights and BatchNorm statistics of ImageNet-like spread (so a test cannot
    pass on the initial scale-1, mean-0 values)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if name.endswith("num_batches_tracked"):
                continue
            if name.endswith("running_var"):
                tensor.copy_(0.5 + torch.rand(tensor.shape, generator=generator))
            elif name.endswith("running_mean") or name.endswith("bias"):
                tensor.copy_(0.1 * torch.randn(tensor.shape, generator=generator))
            elif tensor.ndim == 1:  # BatchNorm scale
                tensor.copy_(0.8 + 0.4 * torch.rand(tensor.shape, generator=generator))
            else:
                fan_in = tensor[0].numel()
                tensor.copy_(torch.randn(tensor.shape, generator=generator) * (1.0 / fan_in) ** 0.5)
    return model
