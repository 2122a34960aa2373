"""FGCNN (Liu et al., WWW 2019): CNN feature generation followed by an IPNN classifier.

Input is the N x k matrix of field embeddings. Each generation layer i applies a
``(h_i x 1)`` convolution with "same" padding (mixing neighbouring fields, one embedding
dimension at a time), optional BatchNorm, tanh, ``(p x 1)`` max pooling, and a
recombination layer (fully connected + tanh) emitting ``pooled_height x rc_i`` new
k-dim features. The new features of every layer are concatenated with the raw
embeddings (T fields), and IPNN takes all T(T-1)/2 pairwise inner products plus the
flattened embeddings into an MLP.

Our choices where the paper is silent (all configurable): pooling uses ``ceil_mode`` so
a layer never pools a short field axis down to zero height; dense features, which the
paper has none of, join the MLP input beside the flattened embeddings.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["FGCNN", "FGCNNConfig", "PRESETS", "pairwise_inner_products", "triu_flat_indices"]


@dataclass
class FGCNNConfig:
    """Sizes of the FGCNN generator and the IPNN classifier.

    ``kernels``, ``channels`` and ``recombination`` have one entry per generation layer
    (all three empty = plain IPNN). ``conv_batchnorm`` is off by default: on MovieLens the
    conv BatchNorm costs AUC (docs/measurements.md) and batch statistics make train-mode
    and eval-mode scores differ, which test-then-train would have to pay for twice.
    """

    embedding_dim: int = 16
    kernels: list[int] = field(default_factory=lambda: [7, 7, 7, 7])
    channels: list[int] = field(default_factory=lambda: [14, 16, 18, 20])
    pooling: int = 2
    recombination: list[int] = field(default_factory=lambda: [3, 3, 3, 3])
    conv_batchnorm: bool = False
    mlp: list[int] = field(default_factory=lambda: [400, 400])
    mlp_batchnorm: bool = False
    dropout: float = 0.0

    def __post_init__(self) -> None:
        n = len(self.kernels)
        if len(self.channels) != n or len(self.recombination) != n:
            raise ValueError(
                f"FGCNN kernels {self.kernels}, channels {self.channels} and recombination "
                f"{self.recombination} must have the same length"
            )
        if self.pooling < 1:
            raise ValueError(f"FGCNN pooling must be >= 1, got {self.pooling}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FGCNNConfig:
        return cls(**data)


# The paper's Criteo setting (Table 2 of arXiv 1904.04447, MLP as we read it) and the
# smaller preset that docs/measurements.md benchmarks.
PRESETS: dict[str, dict[str, Any]] = {
    "criteo": dict(
        embedding_dim=20,
        kernels=[9, 9, 9, 9],
        channels=[38, 40, 42, 44],
        pooling=2,
        recombination=[3, 3, 3, 3],
        mlp=[4096, 2048, 1024, 512],
    ),
    "compact": dict(
        embedding_dim=16,
        kernels=[7, 7, 7, 7],
        channels=[14, 16, 18, 20],
        pooling=2,
        recombination=[3, 3, 3, 3],
        mlp=[400, 400],
    ),
    # Sized for a CPU learner that keeps up with the stream (bench/results/learner.md):
    # two generation layers, narrower embeddings and MLP, ~6x fewer FLOPs per row than
    # "compact" on the product's 33 fields.
    "stream": dict(
        embedding_dim=8,
        kernels=[7, 7],
        channels=[8, 8],
        pooling=2,
        recombination=[2, 2],
        mlp=[256],
    ),
    # The default since issue 12 (BENCHMARKS.md, "Learner sizes"): "stream" with one new
    # feature map per pooled field instead of two and a 128-wide MLP: 2.8x fewer FLOPs
    # per row (T = 59 fields, 1,711 pairs, not 85 and 3,570), the same prequential AUC
    # over a full MovieLens replay; the MLP's first layer over the pairs was 68 % of
    # "stream"'s arithmetic.
    "lean": dict(
        embedding_dim=8,
        kernels=[7, 7],
        channels=[8, 8],
        pooling=2,
        recombination=[1, 1],
        mlp=[128],
    ),
}


def pairwise_inner_products(emb: torch.Tensor, pairs: torch.Tensor | None = None) -> torch.Tensor:
    """All ``T(T-1)/2`` inner products ``<e_i, e_j>, i < j`` of ``emb [B, T, k]``.

    One batched matmul gives the Gram matrix; its strict upper triangle is the answer,
    gathered with one ``index_select`` over the flattened matrix (``pairs`` = the flat
    indices ``i * T + j``, computed here when not given).

    >>> e = torch.tensor([[[1.0, 0.0], [0.0, 2.0], [3.0, 1.0]]])
    >>> pairwise_inner_products(e).tolist()
    [[0.0, 3.0, 2.0]]
    """
    t = emb.shape[1]
    if pairs is None:
        pairs = triu_flat_indices(t, emb.device)
    gram = torch.bmm(emb, emb.transpose(1, 2))
    return gram.flatten(1).index_select(1, pairs)


def triu_flat_indices(t: int, device: torch.device | None = None) -> torch.Tensor:
    """Flat indices ``i * t + j`` of the strict upper triangle of a ``t x t`` matrix.

    >>> triu_flat_indices(3).tolist()
    [1, 2, 5]
    """
    i, j = torch.triu_indices(t, t, offset=1, device=device)
    return i * t + j


def _mlp(sizes: list[int], in_dim: int, batchnorm: bool, dropout: float) -> nn.Sequential:
    layers: list[nn.Module] = []
    for width in sizes:
        layers.append(nn.Linear(in_dim, width))
        if batchnorm:
            layers.append(nn.BatchNorm1d(width))
        layers.append(nn.ReLU())
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        in_dim = width
    layers.append(nn.Linear(in_dim, 1))
    return nn.Sequential(*layers)


class _GenerationLayer(nn.Module):
    """Conv (h x 1, same) -> [BN] -> tanh -> MaxPool (p x 1) -> FC + tanh recombination."""

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        height: int,
        dim: int,
        kernel: int,
        pooling: int,
        rc: int,
        batchnorm: bool,
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, kernel_size=(kernel, 1), padding="same")
        self.bn = nn.BatchNorm2d(out_ch) if batchnorm else nn.Identity()
        self.pooling = pooling
        self.height = height
        self.pooled_height = math.ceil(height / pooling)
        self.new_fields = self.pooled_height * rc
        self.dim = dim
        self.recombine = nn.Linear(out_ch * self.pooled_height * dim, self.new_fields * dim)
        self.register_buffer("taps", _conv_taps(in_ch, out_ch, height, kernel, pooling),
                             persistent=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x [B * k, C * N]`` (one row per example and embedding dimension, channels
        then fields: an ``h x 1`` kernel never mixes dimensions) -> pooled
        ``[B * k, C' * N']`` and new features ``[B, N' * rc, k]``. Weights keep the
        ``Conv2d`` layout.

        The convolution is one matrix product with the kernel spread over a
        ``[C * N, p * C' * N']`` matrix (:func:`_conv_taps`), whose columns come in
        ``p`` blocks, one per offset in a pooling window, so the max pooling is an
        elementwise maximum of the blocks. tanh is monotonic, so it is applied after the
        pooling, to ``p`` times fewer values. On CPU, at these short field axes, this
        costs less than the convolution and pooling ops (docs/decisions.md, "FGCNN's
        generation as one matrix product"). With BatchNorm, whose scale may be negative, the
        convolution runs as written (:meth:`_pooled_with_batchnorm`).
        """
        w = self.conv.weight
        width = w.shape[0] * self.pooled_height
        if isinstance(self.bn, nn.Identity):
            spread = torch.cat([w.flatten(), w.new_zeros(1)]).index_select(
                0, self.taps.flatten()).view(self.taps.shape)
            bias = self.conv.bias.view(1, -1, 1).expand(
                self.pooling, w.shape[0], self.pooled_height).reshape(-1)
            y = torch.addmm(bias, x, spread)
            pooled = y[:, :width]
            for r in range(1, self.pooling):
                pooled = torch.maximum(pooled, y[:, r * width:(r + 1) * width])
            pooled = torch.tanh(pooled)
        else:
            pooled = self._pooled_with_batchnorm(x)
        b = x.shape[0] // self.dim
        # the recombination reads (channel, height, dimension), as the 2-D layout flattens
        flat = pooled.view(b, self.dim, width).transpose(1, 2).reshape(b, width * self.dim)
        new = torch.tanh(self.recombine(flat))
        return pooled, new.view(b, self.new_fields, self.dim)

    def _pooled_with_batchnorm(self, x: torch.Tensor) -> torch.Tensor:
        """Conv -> BN -> tanh -> pool as written: BN's batch statistics count every
        field once, and its scale may be negative."""
        w = self.conv.weight
        # explicit sizes (no -1): an empty batch has no size to infer
        y = F.conv1d(x.view(x.shape[0], w.shape[1], self.height), w.squeeze(-1),
                     self.conv.bias, padding="same")
        y = torch.tanh(self.bn(y.unsqueeze(-1)).squeeze(-1))
        pooled = F.max_pool1d(y, self.pooling, self.pooling, ceil_mode=True)
        return pooled.reshape(x.shape[0], w.shape[0] * self.pooled_height)


def _conv_taps(in_ch: int, out_ch: int, height: int, kernel: int, pooling: int) -> torch.Tensor:
    """Where each entry of the convolution-as-a-matrix comes from: an index into the
    flattened ``Conv2d`` weight ``[C', C, h, 1]``, or its length for a zero.

    Row ``(c, m)`` is input channel ``c`` at field ``m``; column ``(r, c', i)`` is output
    channel ``c'`` at field ``p * i + r``, the ``r``-th field of pooling window ``i``
    (the window's first field again where the field axis ends mid-window: the maximum
    is then over the fields there are, as ``ceil_mode`` pooling takes it). The padding is
    PyTorch's ``"same"``: ``(h - 1) // 2`` zeros before the first field.

    >>> _conv_taps(1, 1, 3, 3, 1).tolist()   # 3 fields, a 3-tap kernel, no pooling
    [[1, 0, 3], [2, 1, 0], [3, 2, 1]]
    >>> _conv_taps(1, 1, 3, 1, 2).tolist()   # the identity kernel, windows {0, 1} and {2}
    [[0, 1, 1, 1], [1, 1, 0, 1], [1, 0, 1, 0]]
    """
    pooled = math.ceil(height / pooling)
    left = (kernel - 1) // 2
    r = torch.arange(pooling).view(pooling, 1, 1)
    i = torch.arange(pooled).view(1, 1, pooled)
    out_field = pooling * i + r
    out_field = torch.where(out_field < height, out_field, pooling * i)  # [p, 1, N']
    oc = torch.arange(out_ch).view(1, out_ch, 1)
    tap = torch.arange(height).view(height, 1, 1, 1) - out_field.unsqueeze(0) + left  # [N, p, 1, N']
    c = torch.arange(in_ch).view(in_ch, 1, 1, 1, 1)
    flat = (oc.unsqueeze(0) * in_ch + c) * kernel + tap.unsqueeze(0)  # [C, N, p, C', N']
    valid = (tap >= 0) & (tap < kernel)
    zero = out_ch * in_ch * kernel
    flat = torch.where(valid.unsqueeze(0), flat, torch.full_like(flat, zero))
    return flat.reshape(in_ch * height, pooling * out_ch * pooled)


class FGCNN(nn.Module):
    """FGCNN head over field embeddings ``[B, N, k]`` (+ dense ``[B, D]``) -> logits ``[B]``.

    >>> m = FGCNN(FGCNNConfig(embedding_dim=4, mlp=[8]), n_fields=5, n_dense=0)
    >>> m.total_fields          # 5 raw + (3 + 2 + 1 + 1) * 3 generated
    26
    >>> m(torch.randn(2, 5, 4), torch.zeros(2, 0)).shape
    torch.Size([2])
    """

    def __init__(self, config: FGCNNConfig, n_fields: int, n_dense: int = 0) -> None:
        super().__init__()
        if n_fields < 1:
            raise ValueError("FGCNN needs at least one categorical field")
        self.config = config
        k = config.embedding_dim
        layers = []
        height, in_ch, total = n_fields, 1, n_fields
        for kernel, ch, rc in zip(
            config.kernels, config.channels, config.recombination, strict=True
        ):
            layer = _GenerationLayer(
                in_ch, ch, height, k, kernel, config.pooling, rc, config.conv_batchnorm
            )
            layers.append(layer)
            height, in_ch = layer.pooled_height, ch
            total += layer.new_fields
        self.generators = nn.ModuleList(layers)
        self.total_fields = total
        n_pairs = total * (total - 1) // 2
        self.register_buffer("pairs", triu_flat_indices(total), persistent=False)
        self.mlp = _mlp(
            config.mlp, n_pairs + total * k + n_dense, config.mlp_batchnorm, config.dropout
        )

    def forward(self, emb: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        b, n, k = emb.shape
        x = emb.transpose(1, 2).reshape(b * k, n)  # fields are the convolved axis
        feats = [emb]
        for layer in self.generators:
            x, new = layer(x)
            feats.append(new)
        all_emb = torch.cat(feats, dim=1)
        z = torch.cat([pairwise_inner_products(all_emb, self.pairs), all_emb.flatten(1), dense],
                      dim=1)
        return self.mlp(z).squeeze(-1)

    @property
    def train_equals_eval(self) -> bool:
        """True when a train-mode forward scores exactly like eval mode (no BN, no dropout)."""
        c = self.config
        return not (c.conv_batchnorm or c.mlp_batchnorm or c.dropout > 0)
