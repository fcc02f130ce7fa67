"""Small models with the patterns sparsify and prune must handle, the checks made on them, and the sizes of the tiny
BERT the Hugging Face tests build."""

import torch
from torch import nn
from torch.nn.utils import parametrize

import l0sparse
from l0sparse import CostModel, Gate


class BasicBlock(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x):
        return torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))


class TinyResNet(nn.Module):
    """Stem conv + BN, a residual block, a depthwise conv, flatten into a Linear."""

    def __init__(self, channels: int = 8, classes: int = 5, side: int = 8) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, channels, 3, padding=1)
        self.bn = nn.BatchNorm2d(channels)
        self.block = BasicBlock(channels)
        self.depthwise = nn.Conv2d(channels, channels, 3, padding=1, groups=channels)
        self.fc = nn.Linear(channels * (side // 2) ** 2, classes)

    def forward(self, x):
        x = self.block(torch.relu(self.bn(self.stem(x))))
        x = nn.functional.max_pool2d(self.depthwise(x), 2)
        return self.fc(torch.flatten(x, 1))


class GlobalPoolNet(nn.Module):
    """Grouped conv, a Conv1d branch-free path, mean over space, then Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.grouped = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.conv2 = nn.Conv2d(8, 6, 1)
        self.head = nn.Linear(6, 4)

    def forward(self, x):
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.grouped(x))
        x = torch.relu(self.conv2(x)).mean((2, 3))
        return self.head(x)


class Conv1dNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(2, 6, 3)
        self.bn = nn.BatchNorm1d(6)
        self.conv2 = nn.Conv1d(6, 5, 3)
        self.fc = nn.Linear(5 * 6, 3)

    def forward(self, x):
        x = torch.relu(self.conv2(torch.relu(self.bn(self.conv1(x)))))
        return self.fc(x.flatten(1))


class AttentionNet(nn.Module):
    def __init__(self, dim: int = 16, heads: int = 4) -> None:
        super().__init__()
        self.attention = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.encoder = nn.TransformerEncoderLayer(dim, heads, 32, dropout=0.0, batch_first=True)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 3)

    def forward(self, x):
        x = x + self.attention(x, x, x, need_weights=False)[0]
        return self.head(self.norm(self.encoder(x)).mean(1))


class PreNormAttentionNet(nn.Module):
    """Attention called with its weights left unread, a pre-norm GELU encoder layer, and a masked call
    that prune must leave whole; batch first or (length, batch, features)."""

    def __init__(self, dim: int = 16, heads: int = 4, length: int = 5, batch_first: bool = True) -> None:
        super().__init__()
        self.register_buffer("causal", torch.triu(torch.ones(length, length, dtype=torch.bool), diagonal=1))
        self.attention = nn.MultiheadAttention(dim, heads, batch_first=batch_first)
        self.encoder = nn.TransformerEncoderLayer(dim, heads, 24, dropout=0.0, activation="gelu", norm_first=True,
                                                  batch_first=batch_first)
        self.masked = nn.MultiheadAttention(dim, heads, batch_first=batch_first)
        self.head = nn.Linear(dim, 3)
        self.sequence_dim = 1 if batch_first else 0

    def forward(self, x):
        x = x + self.attention(x, x, x)[0]
        x = self.encoder(x)
        x = x + self.masked(x, x, x, attn_mask=self.causal, need_weights=False)[0]
        return self.head(x.mean(self.sequence_dim))


def mlp(sizes=(20, 16, 12, 4)) -> nn.Sequential:
    layers = []
    for index, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if index < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


@torch.no_grad()
def randomise(model: nn.Module, scale: float = 3.0, generator: torch.Generator | None = None) -> nn.Module:
    """Random log α (about half the gates closed) and non-trivial BatchNorm statistics."""
    for module in model.modules():
        if isinstance(module, Gate):
            module.log_alpha.copy_(torch.randn(module.log_alpha.shape, generator=generator) * scale)
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.running_mean.copy_(torch.rand(module.running_mean.shape, generator=generator) * 2 - 1)
            module.running_var.copy_(torch.rand(module.running_var.shape, generator=generator) + 0.5)
            module.weight.copy_(torch.randn(module.weight.shape, generator=generator))
            module.bias.copy_(torch.randn(module.bias.shape, generator=generator))
    return model


class OwnAttentionNet(nn.Module):
    """Self-attention written by hand (one qkv Linear, scaled_dot_product_attention, an output projection)."""

    def __init__(self, dim: int = 16, heads: int = 4) -> None:
        super().__init__()
        self.attn = HandWrittenAttention(dim, heads)
        self.head = nn.Linear(dim, 3)

    def forward(self, x):
        return self.head((x + self.attn(x)).mean(1))


class HandWrittenAttention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        q, k, v = [t.unflatten(-1, (self.heads, -1)).transpose(1, 2) for t in (q, k, v)]
        return self.proj(torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2))


def promised_band(controller, model: nn.Module, example) -> float:
    """How far from its target a TargetController promises to land: its tolerance, plus one unit where a unit is
    worth more than the band (the largest saving of closing one unit with all others open bounds any unit's worth)."""
    savings = CostModel(model, example).gate_costs(controller.metric)
    return controller.tolerance + max(float(saving.max()) for saving in savings.values()) / controller._dense


# --- the patterns, gated and randomised, and the checks made on them --------------------------------------------

FLOAT32_TOLERANCE = 1e-5  # max |pruned - gated| relative to the output scale (issue requirement)


def assert_same_outputs(gated, pruned, x):
    gated.eval()
    with torch.no_grad():
        expected, got = gated(x), pruned(x)
    assert expected.shape == got.shape
    scale = float(expected.abs().max())
    assert float((expected - got).abs().max()) <= FLOAT32_TOLERANCE * max(scale, 1.0)


def assert_prunes_exactly(model, x):
    """Pruned outputs equal the gated eval outputs, and the cost model counts what pruning leaves."""
    pruned = l0sparse.prune(model, x)
    assert_same_outputs(model, pruned, x)
    costs = l0sparse.CostModel(model, x).costs(deterministic=True)
    assert float(costs["flops"]) == l0sparse.count_flops(pruned, x)
    assert float(costs["params"]) == l0sparse.count_params(pruned)


def assert_plain(module: nn.Module):
    for sub in module.modules():
        assert not type(sub).__module__.startswith("l0sparse"), type(sub)
        assert not parametrize.is_parametrized(sub)
        assert not sub._forward_hooks and not sub._forward_pre_hooks


CASES = {
    "mlp": (lambda: mlp(), lambda: torch.randn(6, 20), None),
    "resnet": (TinyResNet, lambda: torch.randn(4, 3, 8, 8), None),
    "grouped": (GlobalPoolNet, lambda: torch.randn(4, 3, 6, 6), None),
    "conv1d": (Conv1dNet, lambda: torch.randn(4, 2, 10), None),
    "attention": (AttentionNet, lambda: torch.randn(3, 5, 16), None),
    "attention-prenorm": (PreNormAttentionNet, lambda: torch.randn(3, 5, 16), None),
    "attention-seq-first": (lambda: PreNormAttentionNet(batch_first=False), lambda: torch.randn(5, 3, 16), None),
    "own-attention": (OwnAttentionNet, lambda: torch.randn(3, 5, 16), {"attn": ("heads", 4)}),
    "mlp-out": (lambda: mlp(), lambda: torch.randn(6, 20), {nn.Linear: "out", "4": "in"}),
    "resnet-weight": (TinyResNet, lambda: torch.randn(4, 3, 8, 8), {"block.conv1": "weight", "fc": "weight"}),
}


def build(case, seed=0):
    factory, inputs, rules = CASES[case]
    torch.manual_seed(seed)
    model, x = factory(), inputs()
    l0sparse.sparsify(model, rules=rules, example_inputs=x)
    return randomise(model), x


# --- a tiny BERT (test_elementwise_ops, test_hf_hidden; test_hf_encoders with a feed-forward width of its own) ----

VOCAB, WIDTH, HEADS, FFN = 100, 32, 4, 37


def input_ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(3, VOCAB, (2, 8), generator=torch.Generator().manual_seed(seed))  # no padding id (RoBERTa: 1)
