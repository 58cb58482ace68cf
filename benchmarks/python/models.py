"""The models of benchmarks/models.hpp, built the same way in PyTorch.

Same layers, shapes and parameter counts as the C++ ones (anchors.py checks
the counts against the C++ bench's JSON); the initial weights differ, which
does not change the time of a step. Every model ends in class scores along
its last dimension, and the loss is cross-entropy over that dimension.
"""
import torch
import torch.nn.functional as F
from torch import nn


class Mlp(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(784, 1024)
        self.fc2 = nn.Linear(1024, 1024)
        self.fc3 = nn.Linear(1024, 10)

    def forward(self, x):
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))


class Cnn(nn.Module):
    """The quickstart's CNN."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.fc1 = nn.Linear(64 * 7 * 7, 128)
        self.fc2 = nn.Linear(128, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


class Transformer(nn.Module):
    """One transformer encoder block; takes [batch, sequence, features]."""

    def __init__(self):
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(256, 4, dim_feedforward=1024, dropout=0.0)
        self.head = nn.Linear(256, 10)

    def forward(self, x):
        return self.head(self.layer(x.transpose(0, 1)).mean(0))  # the layer wants [sequence, batch, features]


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        y = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(y + (self.shortcut(x) if self.shortcut is not None else x))


class ResNet18(nn.Module):
    """ResNet-18 for 3x32x32 images: 3x3 stem (no max-pool), 4 stages of 2 basic blocks, 10 classes."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 64, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(64)
        blocks, cin = [], 64
        for cout in (64, 128, 256, 512):
            blocks += [BasicBlock(cin, cout, 1 if cout == 64 else 2), BasicBlock(cout, cout, 1)]
            cin = cout
        self.stages = nn.Sequential(*blocks)
        self.fc = nn.Linear(512, 10)

    def forward(self, x):
        y = self.stages(F.relu(self.bn(self.stem(x))))
        return self.fc(F.adaptive_avg_pool2d(y, (1, 1)).flatten(1))


class TransformerLm(nn.Module):
    """Token and position embeddings (256 wide), 4 post-norm encoder layers (4 heads,
    feed-forward 1024) under a causal mask, a head over the 1000-token vocabulary."""

    VOCABULARY, SEQUENCE, WIDTH, LAYERS = 1000, 128, 256, 4

    def __init__(self):
        super().__init__()
        self.tokens = nn.Embedding(self.VOCABULARY, self.WIDTH)
        self.positions = nn.Embedding(self.SEQUENCE, self.WIDTH)
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(self.WIDTH, 4, dim_feedforward=1024, dropout=0.0) for _ in range(self.LAYERS))
        self.head = nn.Linear(self.WIDTH, self.VOCABULARY)

    def forward(self, x):
        length = x.size(1)
        where = torch.arange(length, device=x.device)
        h = (self.tokens(x) + self.positions(where)).transpose(0, 1)  # the layers want [sequence, batch, features]
        causal = torch.full((length, length), float("-inf"), device=h.device, dtype=h.dtype).triu(1)
        for layer in self.layers:
            h = layer(h, src_mask=causal)
        return self.head(h.transpose(0, 1))


def cross_entropy(scores, target):
    """Cross-entropy over the last dimension, as bench::cross_entropy."""
    return F.cross_entropy(scores.flatten(0, -2), target.flatten())


def _lm_batch(b):
    tokens = torch.randint(TransformerLm.VOCABULARY, (b, TransformerLm.SEQUENCE + 1))
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()


# name: (model class, default GPU batch, default CPU batch, timed by default on a CPU, batch maker)
WORKLOADS = {
    "mlp": (Mlp, 256, 256, True, lambda b: (torch.randn(b, 784), torch.randint(10, (b,)))),
    "cnn": (Cnn, 64, 64, True, lambda b: (torch.randn(b, 1, 28, 28), torch.randint(10, (b,)))),
    "transformer": (Transformer, 16, 16, True, lambda b: (torch.randn(b, 64, 256), torch.randint(10, (b,)))),
    "resnet18": (ResNet18, 256, 16, False, lambda b: (torch.randn(b, 3, 32, 32), torch.randint(10, (b,)))),
    "transformer-lm": (TransformerLm, 64, 4, False, _lm_batch),
}


def make_model(name):
    """A freshly seeded model called `name`."""
    torch.manual_seed(0)
    return WORKLOADS[name][0]()


def make_batch(name, batch_size):
    torch.manual_seed(1)
    return WORKLOADS[name][4](batch_size)


def parameter_count(model):
    return sum(p.numel() for p in model.parameters())


if __name__ == "__main__":
    for name in WORKLOADS:
        print(f"{name}: {parameter_count(make_model(name))} parameters")
