"""A PyTorch mirror of the reference ArSSR, written from docs/REFERENCE.md, for the tests
and the benchmarks. It imports torch; the library proper never imports it.

Module names reproduce the reference's state_dict keys; arrays are in the
reference's own (SimpleITK) axis order: coordinate k indexes tensor axis k + 2.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F


def conv3(cin, cout, k=3):
    return nn.Conv3d(cin, cout, k, padding=k // 2)


class DenseLayer(nn.Module):
    def __init__(self, cin, growth):
        super().__init__()
        self.conv = conv3(cin, growth)

    def forward(self, x):
        return torch.cat([x, F.relu(self.conv(x))], 1)


class RDB(nn.Module):
    def __init__(self, g0, g, c):
        super().__init__()
        self.layers = nn.Sequential(*[DenseLayer(g0 + g * i, g) for i in range(c)])
        self.lff = nn.Conv3d(g0 + g * c, g0, 1)

    def forward(self, x):
        return x + self.lff(self.layers(x))


class RDN(nn.Module):
    def __init__(self, feature_dim=128, g0=64, g=64, d=8, c=3):
        super().__init__()
        self.sfe1 = conv3(1, g0)
        self.sfe2 = conv3(g0, g0)
        self.rdbs = nn.ModuleList([RDB(g0, g, c) for _ in range(d)])
        self.gff = nn.Sequential(nn.Conv3d(g0 * d, g0, 1), conv3(g0, g0))
        self.output = conv3(g0, feature_dim)

    def forward(self, x):
        sfe1 = self.sfe1(x)
        x = self.sfe2(sfe1)
        outs = []
        for block in self.rdbs:
            x = block(x)
            outs.append(x)
        return self.output(self.gff(torch.cat(outs, 1)) + sfe1)


def _conv_relu(cin, cout):
    return nn.Sequential(conv3(cin, cout), nn.ReLU())


class ResCNN(nn.Module):
    def __init__(self, feature_dim=128, width=64, convs=6):
        super().__init__()
        self.conv_start = _conv_relu(1, width)

        def block():
            layers = []
            for _ in range(convs):
                layers += [conv3(width, width), nn.ReLU()]
            return nn.Sequential(*layers)

        self.block1, self.block2, self.block3 = block(), block(), block()
        self.conv_end = nn.Sequential(conv3(width, feature_dim))

    def forward(self, x):
        a = self.conv_start(x)
        b1 = self.block1(a) + a
        b2 = self.block2(b1) + b1
        b3 = self.block3(b2) + b2
        return x + self.conv_end(b3)


class ResBlock(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.m = nn.Sequential(nn.Sequential(conv3(width, width), nn.ReLU()), nn.Sequential(conv3(width, width)))

    def forward(self, x):
        return x + self.m(x)


class SRResNet(nn.Module):
    def __init__(self, feature_dim=128, width=64, blocks=18):
        super().__init__()
        layers = [nn.Sequential(conv3(1, width))]
        layers += [ResBlock(width) for _ in range(blocks)]
        layers += [nn.Sequential(conv3(width, width)), nn.Sequential(conv3(width, feature_dim))]
        self.features = nn.Sequential(*layers)

    def forward(self, x):
        return self.features(x)


def _mlp(widths, cin):
    layers = []
    for w in widths:
        layers += [nn.Linear(cin, w), nn.ReLU()]
        cin = w
    return nn.Sequential(*layers)


class Decoder(nn.Module):
    def __init__(self, cin=131, width=256, depth=8):
        super().__init__()
        hidden = [width] * (depth // 2 - 1)
        self.stage_one = _mlp(hidden + [cin], cin)
        self.stage_two = _mlp(hidden + [1], cin)

    def forward(self, x):
        return self.stage_two(x + self.stage_one(x))


ENCODERS = {"RDN": RDN, "ResCNN": ResCNN, "SRResNet": SRResNet}


class ArSSR(nn.Module):
    def __init__(self, encoder="RDN", feature_dim=128, **encoder_kwargs):
        super().__init__()
        self.encoder = ENCODERS[encoder](feature_dim=feature_dim, **encoder_kwargs)
        self.decoder = Decoder(cin=feature_dim + 3)

    def decode(self, features, coords):
        """features (N, C, D, H, W); coords (N, K, 3) with entry k indexing axis k + 2."""
        n, k = coords.shape[:2]
        grid = coords.flip(-1).view(n, 1, 1, k, 3)
        sampled = F.grid_sample(features, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        sampled = sampled.view(n, -1, k).permute(0, 2, 1)
        return self.decoder(torch.cat([sampled, coords], -1))

    def forward(self, lr, coords):
        return self.decode(self.encoder(lr), coords)


def make_reference(encoder="RDN", seed=0, **kwargs):
    """A random reference model with a positive last decoder bias (non-trivial outputs)."""
    torch.manual_seed(seed)
    model = ArSSR(encoder, **kwargs).eval()
    with torch.no_grad():
        model.decoder.stage_two[-2].bias.fill_(0.5)
    return model
