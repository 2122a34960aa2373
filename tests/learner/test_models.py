import numpy as np
import pytest
import torch

from learner.embeddings import DynamicEmbedding, EmbeddingConfig, HashedEmbedding
from learner.metrics import exact_auc
from learner.models import ModelSpec, build_model, fgcnn_spec
from learner.models.fgcnn import FGCNN, PRESETS, FGCNNConfig, pairwise_inner_products
from learner.protocol import Rows, TorchLearner


@pytest.mark.parametrize("preset, n_fields",
                         [("criteo", 10), ("compact", 14), ("stream", 33), ("lean", 33)])
def test_fgcnn_shapes_for_presets(preset, n_fields):
    cfg = FGCNNConfig(**PRESETS[preset])
    model = FGCNN(cfg, n_fields=n_fields, n_dense=2)
    heights, h = [], n_fields
    for _ in cfg.kernels:
        h = -(-h // cfg.pooling)
        heights.append(h)
    expected_t = n_fields + sum(hh * rc for hh, rc in zip(heights, cfg.recombination, strict=True))
    assert model.total_fields == expected_t
    first = model.mlp[0]
    k = cfg.embedding_dim
    assert first.in_features == expected_t * (expected_t - 1) // 2 + expected_t * k + 2
    assert [m.out_features for m in model.mlp if isinstance(m, torch.nn.Linear)] == cfg.mlp + [1]
    out = model(torch.randn(3, n_fields, k), torch.randn(3, 2))
    assert out.shape == (3,)


def test_pairwise_inner_products_match_loops():
    e = torch.randn(2, 5, 3)
    got = pairwise_inner_products(e)
    want = torch.stack(
        [
            torch.stack([e[b, i] @ e[b, j] for i in range(5) for j in range(i + 1, 5)])
            for b in range(2)
        ]
    )
    torch.testing.assert_close(got, want)


def test_conv_batchnorm_flag_changes_layers():
    with_bn = FGCNN(FGCNNConfig(embedding_dim=4, conv_batchnorm=True, mlp=[8]), 6)
    without = FGCNN(FGCNNConfig(embedding_dim=4, mlp=[8]), 6)
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in with_bn.modules())
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in without.modules())
    assert without.train_equals_eval and not with_bn.train_equals_eval


def test_config_lengths_must_agree():
    with pytest.raises(ValueError, match="same length"):
        FGCNNConfig(kernels=[3], channels=[2, 3], recombination=[1])


def _signal_rows(n, seed):
    rng = np.random.default_rng(seed)
    items = rng.integers(1, 40, n)
    y = (rng.random(n) < np.where(items % 2 == 0, 0.85, 0.15)).astype(np.int8)
    cat = np.stack([rng.integers(1, 30, n), items * 101, rng.integers(0, 3, n)], axis=1)
    return Rows(cat, np.zeros((n, 0), np.float32), y)


@pytest.mark.parametrize("kind", ["hashed", "dynamic"])
def test_tiny_fgcnn_learns_synthetic_signal(kind):
    emb = EmbeddingConfig(kind=kind, buckets=64, capacity=64, min_count=1)
    spec = fgcnn_spec(
        ["u", "i", "c"],
        preset="compact",
        embedding=emb,
        embedding_dim=4,
        kernels=[3, 3],
        channels=[2, 3],
        recombination=[1, 1],
        mlp=[16],
    )
    learner = TorchLearner(build_model(spec), lr=1e-2)
    for seed in range(30):
        learner.learn_many(_signal_rows(128, seed))
    test = _signal_rows(1000, 999)
    assert exact_auc(test.labels, learner.predict_proba_many(test)) > 0.75


@pytest.mark.parametrize("kind", ["lr", "deepfm", "ipnn"])
def test_baselines_learn_the_same_signal(kind):
    head = {
        "lr": {},
        "deepfm": {"embedding_dim": 4, "mlp": [16]},
        "ipnn": {
            "embedding_dim": 4,
            "kernels": [],
            "channels": [],
            "recombination": [],
            "mlp": [16],
        },
    }[kind]
    spec = ModelSpec(kind, ["u", "i", "c"], [], head, EmbeddingConfig(buckets=64).to_dict())
    learner = TorchLearner(build_model(spec), lr=3e-2)
    for seed in range(30):
        learner.learn_many(_signal_rows(128, seed))
    test = _signal_rows(1000, 999)
    assert exact_auc(test.labels, learner.predict_proba_many(test)) > 0.75


def test_hashed_embedding_padding_and_collisions():
    emb = HashedEmbedding(["a", "b"], EmbeddingConfig(dim=2, buckets=5, per_field={"b": 3}))
    rows = emb.lookup(np.array([[0, 0], [5, 3], [10, 6]]))
    assert rows[0].tolist() == [0, 6]  # token 0 -> each field's padding row
    assert rows[1, 0] == rows[2, 0] == 1  # 5 and 10 collide in 5 buckets
    assert emb.table.num_embeddings == 6 + 4


@pytest.mark.parametrize("buckets, per_field", [(8192, {}), (1, {}), (16, {"b": 4}), (16, {"b": 12})])
def test_hashed_embedding_rows_are_the_tokens_modulo_buckets(buckets, per_field):
    """Powers of two take the tokens' low bits, anything else ``%``: the same rows for
    every int64, the extremes and negative tokens too."""
    emb = HashedEmbedding(["a", "b", "c"], EmbeddingConfig(dim=2, buckets=buckets, per_field=per_field))
    rng = np.random.default_rng(3)
    tokens = rng.integers(-2**63, 2**63 - 1, (400, 3), dtype=np.int64, endpoint=True)
    tokens[:4] = [[0, -1, 1], [-2**63, 2**63 - 1, 0], [7, -7, 8], [0, 0, 0]]
    sizes = np.array([buckets, per_field.get("b", buckets), buckets])
    base = np.concatenate([[0], np.cumsum(sizes + 1)[:-1]])
    want = np.where(tokens == 0, 0, 1 + tokens % sizes) + base
    assert emb.lookup(tokens).numpy().tolist() == want.tolist()


def test_dynamic_admission_expiry_and_capacity():
    cfg = EmbeddingConfig(kind="dynamic", dim=2, capacity=2, min_count=2, idle_rows=3)
    emb = DynamicEmbedding(["f"], cfg)
    emb.observe(np.array([[7], [8]]))
    assert emb.lookup(np.array([[7]])).item() == 1  # one sighting: unadmitted
    emb.observe(np.array([[7], [8]]))
    assert emb.lookup(np.array([[7], [8]])).ravel().tolist() == [2, 3]
    emb.observe(np.array([[9], [9]]))  # full: evicts the LRU id
    assert emb.evicted_total == 1 and emb.lookup(np.array([[9]])).item() in (2, 3)
    emb.observe(np.array([[9]]))
    emb.observe(np.array([[9]]))
    emb.observe(np.array([[9]]))
    emb.observe(np.array([[9]]))  # 7/8 idle > 3 rows: expired
    assert emb.expired_total >= 1
    assert sorted(emb.lookup(np.array([[7], [8]])).ravel().tolist()) == [1, 1]


def test_dynamic_state_survives_state_dict_round_trip():
    spec = fgcnn_spec(
        ["f"],
        embedding=EmbeddingConfig(kind="dynamic", capacity=8),
        embedding_dim=2,
        kernels=[],
        channels=[],
        recombination=[],
        mlp=[4],
    )
    a = build_model(spec)
    a.embedding.observe(np.array([[11], [12]]))
    b = build_model(spec)
    b.load_state_dict(a.state_dict())
    toks = np.array([[11], [12], [13]])
    assert b.embedding.lookup(toks).tolist() == a.embedding.lookup(toks).tolist()


def test_packed_state_holds_only_touched_rows_and_restores_the_rest():
    spec = fgcnn_spec(
        ["u", "i"],
        embedding=EmbeddingConfig(buckets=50_000),
        embedding_dim=4,
        kernels=[],
        channels=[],
        recombination=[],
        mlp=[4],
    )
    learner = TorchLearner(build_model(spec))
    learner.learn_many(
        Rows(np.array([[1, 2], [3, 4]]), np.zeros((2, 0), np.float32), np.array([1, 0]))
    )
    state = learner.state_dict()
    packed = state["model"]["embedding.table.packed_values"]
    assert "embedding.table.weight" not in state["model"]
    assert packed.shape[0] <= 4  # at most the rows this batch used, not 100k
    fresh = TorchLearner(build_model(spec))
    fresh.load_state_dict(state)
    torch.testing.assert_close(
        fresh.model.embedding.table.weight, learner.model.embedding.table.weight
    )
    for k, v in fresh.sparse_optimizer.state_dict()["state"][0].items():
        torch.testing.assert_close(v, learner.sparse_optimizer.state_dict()["state"][0][k])


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
@pytest.mark.parametrize("batchnorm", [False, True])
@pytest.mark.parametrize(("fields", "kernels", "pooling"), [
    (7, [3, 3], 2),     # odd field counts: the last pooling window is short
    (33, [7, 7], 2),    # the default "lean" preset's shape on the product's 33 fields
    (10, [4, 2], 3),    # even kernels pad one more zero after than before
    (5, [5, 1], 1),     # no pooling; a kernel longer than the pooled field axis
])
def test_fgcnn_generation_equals_the_papers_2d_layout(batchnorm, fields, kernels, pooling):
    """The generation as one matrix product (one row per example and dimension)
    computes the paper's (h x 1) Conv2d -> tanh -> (p x 1) MaxPool2d (ceil) ->
    recombination, and gives its gradients."""
    import torch.nn.functional as F

    from learner.models.fgcnn import FGCNN, FGCNNConfig

    cfg = FGCNNConfig(embedding_dim=4, kernels=kernels, channels=[2, 3], recombination=[2, 1],
                      pooling=pooling, conv_batchnorm=batchnorm, mlp=[8])
    torch.manual_seed(0)
    m = FGCNN(cfg, n_fields=fields, n_dense=0)
    m.train()
    emb = torch.randn(5, fields, 4)
    x, want = emb.unsqueeze(1), [emb]
    for layer in m.generators:
        y = F.conv2d(x, layer.conv.weight, layer.conv.bias, padding="same")
        if batchnorm:
            y = F.batch_norm(y, None, None, layer.bn.weight, layer.bn.bias, training=True)
        x = F.max_pool2d(torch.tanh(y), kernel_size=(cfg.pooling, 1), ceil_mode=True)
        want.append(torch.tanh(layer.recombine(x.flatten(1))).view(5, -1, 4))
    all_emb = torch.cat(want, dim=1)
    i, j = torch.triu_indices(all_emb.shape[1], all_emb.shape[1], offset=1)
    gram = all_emb @ all_emb.transpose(1, 2)
    z = torch.cat([gram[:, i, j], all_emb.flatten(1)], dim=1)
    expected = m.mlp(z).squeeze(-1)
    got = m(emb, torch.zeros(5, 0))
    torch.testing.assert_close(got, expected)
    weights = [p for layer in m.generators for p in (layer.conv.weight, layer.conv.bias)]
    for g_got, g_want in zip(torch.autograd.grad(got.sum(), weights),
                             torch.autograd.grad(expected.sum(), weights), strict=True):
        torch.testing.assert_close(g_got, g_want)


@pytest.mark.parametrize("batchnorm", [False, True])
def test_fgcnn_scores_an_empty_batch(batchnorm):
    """A request whose candidates all fell out scores zero rows, on either path."""
    cfg = FGCNNConfig(embedding_dim=4, kernels=[3, 3], channels=[2, 3], recombination=[2, 1],
                      conv_batchnorm=batchnorm, mlp=[8])
    m = FGCNN(cfg, n_fields=7, n_dense=2).eval()
    assert m(torch.zeros(0, 7, 4), torch.zeros(0, 2)).shape == (0,)


@pytest.mark.parametrize("kind", ["fgcnn", "deepfm"])
def test_wide_ids_is_a_linear_term_over_the_ids_that_starts_at_zero(kind):
    spec = fgcnn_spec(["u", "i", "c"], preset="compact", embedding=EmbeddingConfig(buckets=64),
                      embedding_dim=4, kernels=[3, 3], channels=[2, 3], recombination=[1, 1],
                      mlp=[16])
    spec.kind = kind
    if kind == "deepfm":
        spec.head = {"embedding_dim": 4, "mlp": [16]}
    spec.wide_ids = 10.0
    assert ModelSpec.from_dict(spec.to_dict()).wide_ids == 10.0
    model = build_model(spec)
    w = model.embedding.table.weight
    assert w.shape[1] == 4 + (1 if kind == "deepfm" else 0) + 1 and not w[:, -1].any()
    rows = _signal_rows(256, 0)
    base = model.logits(rows.categorical, rows.dense).detach()
    with torch.no_grad():
        w[:, -1] = 0.01  # every id's weight: each row's logit moves by 3 fields * 0.01 * 10
    moved = model.logits(rows.categorical, rows.dense).detach()
    torch.testing.assert_close(moved - base, torch.full_like(base, 0.3))
    learner = TorchLearner(build_model(spec), lr=1e-2)
    for seed in range(30):
        learner.learn_many(_signal_rows(128, seed))
    test = _signal_rows(1000, 999)
    assert exact_auc(test.labels, learner.predict_proba_many(test)) > 0.75
