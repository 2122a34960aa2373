from __future__ import annotations

import numpy as np
import pytest
import torch

from learner.multimodal import AlignmentTower, FusionQFormer, content_id_infonce, info_nce


def test_qformer_shape_masks_and_gradients():
    torch.manual_seed(0)
    qf = FusionQFormer(
        out_dim=8,
        text_dim=24,
        n_queries=3,
        d_model=16,
        n_heads=2,
        n_layers=2,
        vector_dims={"img": 5},
    )
    text = torch.randn(4, 24)
    text[3] = 0  # no text
    tags = torch.tensor([[11, 12, 0], [13, 0, 0], [0, 0, 0], [0, 0, 0]])
    vec = {"img": torch.randn(4, 5)}
    out = qf(text, tags, vec)
    assert out.shape == (4, 3, 8)
    assert torch.isfinite(out).all()  # row 3 has no text or tags, only the null token
    out.pow(2).sum().backward()
    for name in ("queries", "text_proj.weight", "out.weight", "vec_proj.img.weight"):
        grad = dict(qf.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name
    assert qf.tag_table.weight.grad[0].abs().sum() == 0  # padding row untouched


def test_qformer_output_depends_on_content():
    torch.manual_seed(0)
    qf = FusionQFormer(out_dim=8, text_dim=6, n_queries=2, d_model=16, n_heads=2)
    a = qf(torch.randn(1, 6), torch.tensor([[5]]))
    b = qf(torch.randn(1, 6), torch.tensor([[9]]))
    assert not torch.allclose(a, b)


def test_infonce_lower_for_aligned_than_shuffled():
    torch.manual_seed(0)
    content = torch.randn(64, 16)
    ids = content @ torch.randn(16, 16) * 0.1 + content  # correlated "id" embeddings
    aligned = content_id_infonce(content, ids, temperature=0.1)
    shuffled = content_id_infonce(content, ids[torch.randperm(64)], temperature=0.1)
    assert aligned < shuffled
    with pytest.raises(ValueError, match="temperature"):
        info_nce(content, ids, temperature=0.0)


def test_infonce_masks_repeated_ids():
    x = torch.randn(4, 8)
    dup = torch.cat([x[:2], x[:2]])
    ids = torch.tensor([0, 1, 0, 1])
    # Without masking, the duplicate of each row competes with its own positive.
    assert info_nce(dup, dup, 0.1, ids) < info_nce(dup, dup, 0.1)


def test_alignment_tower_starts_identity_learns_pairs_and_exports():
    rng = np.random.default_rng(0)
    n, d = 512, 16
    base = rng.standard_normal((n, d)).astype(np.float32)
    # Behaviour pairs items whose content differs in a hidden direction.
    mix = rng.standard_normal((d, d)).astype(np.float32) * 0.6
    trig, tgt = base, base @ mix + 0.1 * rng.standard_normal((n, d)).astype(np.float32)
    tower = AlignmentTower(d, temperature=0.1)
    np.testing.assert_allclose(
        tower.project_numpy(base[:3]),
        base[:3] / np.linalg.norm(base[:3], axis=1, keepdims=True),
        rtol=1e-5,
        atol=1e-6,
    )
    history = tower.fit(trig, tgt, epochs=8, batch_size=128, lr=1e-2)
    assert history[-1] < history[0]
    w = tower.export_numpy()
    assert w["weight"].shape == (d, d) and w["bias"].shape == (d,)
    manual = base[:5] @ w["weight"].T + w["bias"]
    manual /= np.linalg.norm(manual, axis=1, keepdims=True)
    np.testing.assert_allclose(tower.project_numpy(base[:5]), manual, rtol=1e-4, atol=1e-5)
