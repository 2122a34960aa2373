"""Multimodal item towers: QARM alignment, EM3 Fusion-Q-Former and content-ID contrastive.

- :class:`AlignmentTower` — a projection of frozen content embeddings trained with
  in-batch InfoNCE on ``<trigger, target>`` pairs mined from clicks
  (``features.alignment``). It is linear on purpose: it exports to two numpy arrays
  that the items-side ``CodeAssigner`` applies without importing torch, and it starts
  as the identity so an untrained tower leaves the content space as it is.
- :class:`FusionQFormer` — a fixed set of trainable queries cross-attending to the
  modality tokens of an item (projected text embedding, tag embeddings, optional
  vectors) and emitting ``n_queries`` vectors of the ranker's embedding size, i.e.
  extra fields for FGCNN, trained end-to-end by the ranking loss. The sentence encoder
  itself stays frozen (its output arrives as a tensor).
- :func:`content_id_infonce` — EM3's content-ID contrastive loss, in-batch.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["AlignmentTower", "FusionQFormer", "content_id_infonce", "info_nce"]


def info_nce(
    a: torch.Tensor,
    b: torch.Tensor,
    temperature: float = 0.1,
    ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Symmetric in-batch InfoNCE: row ``i`` of ``a`` should match row ``i`` of ``b``.

    Both inputs are L2-normalised here. When ``ids`` is given, off-diagonal entries
    with the same id as the diagonal are masked out: a batch that holds the same item
    twice must not push it away from itself.

    >>> torch.manual_seed(0) and None
    >>> x = torch.randn(8, 4)
    >>> bool(info_nce(x, x) < info_nce(x, x[torch.randperm(8)]))
    True
    """
    if a.shape != b.shape:
        raise ValueError(f"info_nce needs equal shapes, got {tuple(a.shape)} and {tuple(b.shape)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    logits = F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).T / temperature
    if ids is not None:
        same = ids[:, None] == ids[None, :]
        same.fill_diagonal_(False)
        logits = logits.masked_fill(same, float("-inf"))
    target = torch.arange(len(a), device=a.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


def content_id_infonce(
    content_emb: torch.Tensor,
    id_emb: torch.Tensor,
    temperature: float = 0.1,
    ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """EM3 content-ID contrastive loss: an item's content embedding vs. its ID embedding.

    In-batch negatives; an auxiliary term added to the log-loss with a configurable
    weight. Inputs may be ``(B, d)`` or ``(B, n, d)`` (flattened per row).

    Parameters
    ----------
    content_emb, id_emb
        Same-shaped tensors, one row per item occurrence.
    temperature
        Softmax temperature (> 0).
    ids
        Optional item ids, so repeats of an item in the batch are not negatives.
    """
    return info_nce(content_emb.flatten(1), id_emb.flatten(1), temperature, ids)


class AlignmentTower(nn.Module):
    """Linear projection of content embeddings, aligned to behaviour by InfoNCE on pairs.

    Parameters
    ----------
    in_dim
        Content embedding size.
    out_dim
        Aligned size (default ``in_dim``; then the tower starts as the identity).
    temperature
        InfoNCE temperature.

    >>> tower = AlignmentTower(4)
    >>> x = np.eye(4, dtype=np.float32)
    >>> np.allclose(tower.project_numpy(x), x)
    True
    """

    def __init__(self, in_dim: int, out_dim: int | None = None, temperature: float = 0.07) -> None:
        super().__init__()
        out_dim = out_dim or in_dim
        self.temperature = temperature
        self.linear = nn.Linear(in_dim, out_dim)
        with torch.no_grad():
            if out_dim == in_dim:
                self.linear.weight.copy_(torch.eye(in_dim))
            else:
                nn.init.orthogonal_(self.linear.weight)
            self.linear.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Aligned, L2-normalised embeddings."""
        return F.normalize(self.linear(x), dim=-1)

    def loss(
        self, trigger: torch.Tensor, target: torch.Tensor, ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """In-batch InfoNCE of projected triggers against projected targets."""
        return info_nce(self(trigger), self(target), self.temperature, ids)

    def fit(
        self,
        trigger: np.ndarray,
        target: np.ndarray,
        *,
        target_ids: np.ndarray | None = None,
        epochs: int = 2,
        batch_size: int = 256,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        seed: int = 0,
    ) -> list[float]:
        """Train on ``(n, in_dim)`` trigger/target arrays; returns the mean loss per epoch.

        ``weight_decay`` penalises the squared distance of the parameters from their
        values at the start of this call (the projection currently published), not from
        zero: each re-fit then moves the aligned space, and so the codes, only as far as
        the new pairs justify.
        """
        gen = torch.Generator().manual_seed(seed)
        trig = torch.as_tensor(np.asarray(trigger, dtype=np.float32))
        tgt = torch.as_tensor(np.asarray(target, dtype=np.float32))
        tid = None if target_ids is None else torch.as_tensor(np.asarray(target_ids))
        start = [p.detach().clone() for p in self.parameters()]
        opt = torch.optim.Adam(self.parameters(), lr=lr)
        history: list[float] = []
        self.train()
        for _ in range(epochs):
            order = torch.randperm(len(trig), generator=gen)
            total, steps = 0.0, 0
            for s in range(0, len(order), batch_size):
                idx = order[s : s + batch_size]
                if len(idx) < 2:
                    continue
                loss = self.loss(trig[idx], tgt[idx], None if tid is None else tid[idx])
                if weight_decay:
                    loss = loss + weight_decay * sum(
                        ((p - p0) ** 2).sum()
                        for p, p0 in zip(self.parameters(), start, strict=True)
                    )
                opt.zero_grad()
                loss.backward()
                opt.step()
                total += float(loss.detach())
                steps += 1
            history.append(total / max(steps, 1))
        self.eval()
        return history

    def export_numpy(self) -> dict[str, np.ndarray]:
        """``{"weight": (out, in), "bias": (out,)}`` float32, for ``features.codes_service``."""
        return {
            "weight": self.linear.weight.detach().cpu().numpy().astype(np.float32),
            "bias": self.linear.bias.detach().cpu().numpy().astype(np.float32),
        }

    def project_numpy(self, x: np.ndarray) -> np.ndarray:
        """Apply the tower to a numpy array (no grad), normalised like :meth:`forward`."""
        with torch.no_grad():
            return self(torch.as_tensor(np.asarray(x, dtype=np.float32))).numpy()


class _CrossAttentionBlock(nn.Module):
    def __init__(self, d_model: int, n_heads: int, dropout: float) -> None:
        super().__init__()
        self.norm_q = nn.LayerNorm(d_model)
        self.norm_kv = nn.LayerNorm(d_model)
        self.attn = nn.MultiheadAttention(d_model, n_heads, dropout=dropout, batch_first=True)
        self.norm_ff = nn.LayerNorm(d_model)
        self.ff = nn.Sequential(
            nn.Linear(d_model, 2 * d_model), nn.GELU(), nn.Linear(2 * d_model, d_model)
        )

    def forward(self, q: torch.Tensor, kv: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        kv = self.norm_kv(kv)
        attended, _ = self.attn(self.norm_q(q), kv, kv, key_padding_mask=pad, need_weights=False)
        q = q + attended
        return q + self.ff(self.norm_ff(q))


class FusionQFormer(nn.Module):
    """Trainable queries cross-attend to an item's modality tokens -> fixed-size fields.

    Tokens: one for the (frozen) text embedding, one per tag, one per given vector
    modality, plus an always-present learned "null" token so an item with no content
    still yields a defined output. Each token gets a learned modality-type embedding.

    Parameters
    ----------
    out_dim
        Size of each output vector (the ranker's field embedding size).
    text_dim
        Input text embedding size (384 for all-MiniLM-L6-v2).
    n_queries
        Number of learned queries = output vectors (extra ranker fields).
    d_model, n_heads, n_layers
        Width, heads and depth of the cross-attention stack.
    tag_buckets
        Rows of the hashed tag-token table; token ``0`` is padding.
    vector_dims
        ``{modality: dim}`` of optional vector inputs.

    >>> qf = FusionQFormer(out_dim=8, text_dim=12, n_queries=3, d_model=16, n_heads=2)
    >>> qf(torch.randn(5, 12), torch.tensor([[7, 9]] * 5)).shape
    torch.Size([5, 3, 8])
    """

    def __init__(
        self,
        out_dim: int = 16,
        text_dim: int = 384,
        n_queries: int = 4,
        d_model: int = 32,
        n_heads: int = 4,
        n_layers: int = 1,
        tag_buckets: int = 4096,
        vector_dims: Mapping[str, int] | None = None,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.n_queries = n_queries
        self.out_dim = out_dim
        self.tag_buckets = tag_buckets
        self.vector_names = sorted(vector_dims or {})
        self.queries = nn.Parameter(torch.randn(n_queries, d_model) * 0.02)
        self.text_proj = nn.Linear(text_dim, d_model)
        self.tag_table = nn.Embedding(tag_buckets, d_model, padding_idx=0)
        nn.init.normal_(self.tag_table.weight, std=0.02)
        with torch.no_grad():
            self.tag_table.weight[0].zero_()
        self.vec_proj = nn.ModuleDict(
            {m: nn.Linear(d, d_model) for m, d in (vector_dims or {}).items()}
        )
        # Type rows: 0 null, 1 text, 2 tag, 3.. vector modalities.
        self.type_emb = nn.Embedding(3 + len(self.vector_names), d_model)
        self.blocks = nn.ModuleList(
            [_CrossAttentionBlock(d_model, n_heads, dropout) for _ in range(n_layers)]
        )
        self.out_norm = nn.LayerNorm(d_model)
        self.out = nn.Linear(d_model, out_dim)

    def tag_rows(self, tag_tokens: torch.Tensor) -> torch.Tensor:
        """Hashed tag tokens (int64, ``0`` = padding) to table rows (``0`` stays ``0``)."""
        rows = torch.remainder(tag_tokens, self.tag_buckets - 1) + 1
        return torch.where(tag_tokens == 0, torch.zeros_like(rows), rows)

    def forward(
        self,
        text: torch.Tensor,
        tag_tokens: torch.Tensor | None = None,
        vectors: Mapping[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """``(B, n_queries, out_dim)`` fused item fields.

        ``text`` is ``(B, text_dim)`` (all-zero rows = no text), ``tag_tokens`` is
        ``(B, T)`` int64 with ``0`` = padding, ``vectors`` maps modality to ``(B, d)``
        (all-zero rows = absent).
        """
        batch = text.shape[0]
        dev = text.device
        type_w = self.type_emb.weight
        tokens = [type_w[0].expand(batch, 1, -1), (self.text_proj(text) + type_w[1]).unsqueeze(1)]
        pads = [
            torch.zeros(batch, 1, dtype=torch.bool, device=dev),
            (text.abs().sum(-1) == 0).unsqueeze(1),
        ]
        if tag_tokens is not None and tag_tokens.shape[1] > 0:
            tokens.append(self.tag_table(self.tag_rows(tag_tokens)) + type_w[2])
            pads.append(tag_tokens == 0)
        for j, name in enumerate(self.vector_names):
            vec = None if vectors is None else vectors.get(name)
            if vec is None:
                continue
            tokens.append((self.vec_proj[name](vec) + type_w[3 + j]).unsqueeze(1))
            pads.append((vec.abs().sum(-1) == 0).unsqueeze(1))
        kv = torch.cat(tokens, dim=1)
        pad = torch.cat(pads, dim=1)
        q = self.queries.unsqueeze(0).expand(batch, -1, -1)
        for block in self.blocks:
            q = block(q, kv, pad)
        return self.out(self.out_norm(q))
