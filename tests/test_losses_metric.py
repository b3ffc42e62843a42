"""Metric and distillation losses: loop references, hand-checked cases, and a toy training run."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from voiceprint.engine.losses import create_loss
from voiceprint.engine.losses.distill import EmbeddingDistillationLoss
from voiceprint.engine.losses.e2e import E2ELoss
from voiceprint.engine.losses.ge2e import GE2EContrastLoss, GE2ESoftmaxLoss
from voiceprint.engine.losses.pairwise import PairwiseBCELoss
from voiceprint.engine.losses.triplet import TripletLoss

METRIC = ["pairwise-bce", "triplet", "e2e", "ge2e-softmax", "ge2e-contrast"]


def random_batch(n=3, m=4, d=5, seed=0):
    return torch.randn(n, m, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def gram_batch(gram, n, m):
    """Unit vectors whose pairwise cosines are ``gram`` (rows of its Cholesky factor), as [N, M, B]."""
    return torch.linalg.cholesky(torch.tensor(gram, dtype=torch.float64)).reshape(n, m, -1)


def unit(v):
    norm = math.sqrt(sum(a * a for a in v))
    return [a / norm for a in v]


def cos(u, v):
    return sum(a * b for a, b in zip(unit(u), unit(v)))


def mean_vector(vectors):
    return [sum(column) / len(vectors) for column in zip(*vectors)]


def sigmoid(z):
    return 1.0 / (1.0 + math.exp(-z))


def softplus(z):
    return math.log1p(math.exp(z))


def angles(*degrees):
    return [[math.cos(math.radians(a)), math.sin(math.radians(a))] for a in degrees]


# --- GE2E ------------------------------------------------------------------------------


def ge2e_reference(batch, w, b, variant):
    e = [[unit(u) for u in speaker] for speaker in batch.tolist()]
    n, m = len(e), len(e[0])
    total = 0.0
    for j in range(n):
        for i in range(m):
            scores = []
            for k in range(n):
                members = [e[k][t] for t in range(m) if not (k == j and t == i)]
                scores.append(w * cos(e[j][i], mean_vector(members)) + b)
            if variant == "softmax":
                total += -scores[j] + math.log(sum(math.exp(s) for s in scores))
            else:
                impostor = max(sigmoid(s) for k, s in enumerate(scores) if k != j)
                total += 1.0 - sigmoid(scores[j]) + impostor
    return total / (n * m)


def test_ge2e_softmax_matches_loop_reference():
    loss = GE2ESoftmaxLoss(init_w=7.0).double()
    batch = random_batch()
    expected = ge2e_reference(batch, loss.w.item(), 0.0, "softmax")
    assert loss(batch).item() == pytest.approx(expected, abs=1e-6)


def test_ge2e_contrast_matches_loop_reference():
    loss = GE2EContrastLoss(init_w=7.0, init_b=-2.0).double()
    batch = random_batch()
    expected = ge2e_reference(batch, loss.w.item(), loss.b.item(), "contrast")
    assert loss(batch).item() == pytest.approx(expected, abs=1e-6)


def test_ge2e_softmax_has_no_bias_because_the_softmax_ignores_it():
    assert [name for name, _ in GE2ESoftmaxLoss().named_parameters()] == ["w_raw"]
    assert {name for name, _ in GE2EContrastLoss().named_parameters()} == {"w_raw", "b"}


def test_ge2e_own_centroid_excludes_the_utterance():
    loss = GE2EContrastLoss().double()
    w, b = loss.w.item(), loss.b.item()
    batch = random_batch(n=3, m=4, d=5)
    moved = batch.clone()
    moved[0, 0] = torch.tensor([1.0, -2.0, 0.5, 3.0, -1.0], dtype=torch.float64)
    before, after = loss.similarities(batch), loss.similarities(moved)
    rows = [[unit(u) for u in speaker] for speaker in moved.tolist()]

    # Own score of the moved utterance: its centroid is the mean of the other M - 1 only.
    assert after[0, 0, 0].item() == pytest.approx(w * cos(rows[0][0], mean_vector(rows[0][1:])) + b, abs=1e-9)
    # Against another speaker: that speaker's full centroid.
    assert after[0, 0, 1].item() == pytest.approx(w * cos(rows[0][0], mean_vector(rows[1])) + b, abs=1e-9)
    # Moving e_00 changes c_0 as the other utterances see it (own and impostor terms)...
    assert not torch.allclose(before[0, 1:, 0], after[0, 1:, 0])
    assert not torch.allclose(before[1:, :, 0], after[1:, :, 0])
    # ...but nothing that does not involve e_00 or c_0.
    assert torch.allclose(before[1:, :, 1:], after[1:, :, 1:], rtol=0, atol=1e-12)


# --- triplet -------------------------------------------------------------------------------


def triplet_reference(batch, alpha, mining):
    x = [unit(u) for speaker in batch.tolist() for u in speaker]
    m = batch.shape[1]
    s = [[sum(a * b for a, b in zip(u, v)) for v in x] for u in x]
    losses = []
    for a in range(len(x)):
        positives = [p for p in range(len(x)) if p // m == a // m and p != a]
        negatives = [q for q in range(len(x)) if q // m != a // m]
        hardest = max(s[a][q] for q in negatives)
        if mining == "batch-hard":
            losses.append(max(0.0, hardest - min(s[a][p] for p in positives) + alpha))
            continue
        for p in positives:
            semi = [s[a][q] for q in negatives if s[a][p] - alpha < s[a][q] < s[a][p]]
            losses.append(max(0.0, (max(semi) if semi else hardest) - s[a][p] + alpha))
    active = [v for v in losses if v > 0]
    return sum(active) / max(len(active), 1), len(active) / len(losses)


@pytest.mark.parametrize("mining", ["batch-hard", "semi-hard"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_triplet_matches_loop_reference(mining, seed):
    loss = TripletLoss(alpha=0.3, mining=mining)
    batch = random_batch(n=4, m=3, d=4, seed=seed)
    expected, fraction = triplet_reference(batch, 0.3, mining)
    assert loss(batch).item() == pytest.approx(expected, abs=1e-9)
    assert loss.last_active_fraction == pytest.approx(fraction)


@pytest.mark.parametrize("mining", ["batch-hard", "semi-hard"])
def test_triplet_is_exactly_zero_when_every_margin_holds(mining):
    # Speaker k sits near basis vector k: positives ~1, negatives ~0, far beyond alpha.
    noise = 0.01 * random_batch(n=3, m=4, d=3)
    batch = (torch.eye(3, dtype=torch.float64)[:, None, :] + noise).requires_grad_(True)
    loss = TripletLoss(mining=mining)
    value = loss(batch)
    assert value.item() == 0.0
    assert loss.last_active_fraction == 0.0
    value.backward()
    assert torch.equal(batch.grad, torch.zeros_like(batch))


def test_batch_hard_mines_the_hardest_positive_and_negative():
    # Speaker A at 0, 10 and 100 degrees; speaker B at 180, 185 and 200. Only anchor a2
    # (100) violates the margin: its hardest positive is a0 (100 degrees away), its hardest
    # negative b0 (80 degrees away).
    batch = torch.tensor([angles(0, 10, 100), angles(180, 185, 200)], dtype=torch.float64, requires_grad=True)
    loss = TripletLoss(alpha=0.2)
    value = loss(batch)
    assert value.item() == pytest.approx(math.cos(math.radians(80)) - math.cos(math.radians(100)) + 0.2)
    assert loss.last_active_fraction == pytest.approx(1 / 6)
    value.backward()
    touched = batch.grad.abs().sum(dim=-1) > 0
    assert touched.tolist() == [[True, False, True], [True, False, False]]


# Cosines of a0, a1 | b0, b1. Anchor a0: positive a1 at 0.5, negatives b0 at 0.6 (harder
# than the positive) and b1 at 0.4 (semi-hard: inside the margin). Every other anchor
# satisfies the margin.
GRAM = [[1.0, 0.5, 0.6, 0.4], [0.5, 1.0, -0.2, -0.2], [0.6, -0.2, 1.0, 0.9], [0.4, -0.2, 0.9, 1.0]]


def test_semi_hard_takes_the_negative_inside_the_margin_where_batch_hard_takes_the_hardest():
    batch = gram_batch(GRAM, 2, 2)
    batch_hard, semi_hard = TripletLoss(0.2, "batch-hard"), TripletLoss(0.2, "semi-hard")
    assert batch_hard(batch).item() == pytest.approx(0.6 - 0.5 + 0.2)
    assert semi_hard(batch).item() == pytest.approx(0.4 - 0.5 + 0.2)
    assert batch_hard.last_active_fraction == semi_hard.last_active_fraction == 0.25


def test_semi_hard_falls_back_to_the_hardest_negative():
    gram = [row[:] for row in GRAM]
    gram[0][3] = gram[3][0] = 0.65  # b1 is now harder than the positive too: no semi-hard negative
    batch = gram_batch(gram, 2, 2)
    assert TripletLoss(0.2, "semi-hard")(batch).item() == pytest.approx(0.65 - 0.5 + 0.2)


# --- pairwise and E2E ----------------------------------------------------------------------


@pytest.mark.parametrize("balance", [True, False])
def test_pairwise_weights_genuine_and_impostor_pairs(balance):
    loss = PairwiseBCELoss(balance=balance).double()
    w, b = loss.w.item(), loss.b.item()
    genuine = [softplus(-(w * GRAM[0][1] + b)), softplus(-(w * GRAM[2][3] + b))]
    impostor = [softplus(w * GRAM[i][j] + b) for i in (0, 1) for j in (2, 3)]
    if balance:  # 2 genuine pairs weigh 1/4 each, 4 impostor pairs 1/8 each
        expected = sum(genuine) / 4 + sum(impostor) / 8
    else:
        expected = (sum(genuine) + sum(impostor)) / 6
    assert loss(gram_batch(GRAM, 2, 2)).item() == pytest.approx(expected, abs=1e-9)


def test_e2e_matches_hand_computation():
    loss = E2ELoss(negative_weight=0.3).double()
    w, b = loss.w.item(), loss.b.item()
    batch = torch.tensor([angles(0, 20, 30), angles(90, 130, 60)], dtype=torch.float64)
    # Models: mean of the first two utterances (10 and 110 degrees); tests: 30 and 60 degrees.
    z = [[w * math.cos(math.radians(test - model)) + b for model in (10, 110)] for test in (30, 60)]
    expected = (softplus(-z[0][0]) + softplus(-z[1][1]) + 0.3 * (softplus(z[0][1]) + softplus(z[1][0]))) / 4
    assert loss(batch).item() == pytest.approx(expected, abs=1e-9)


def test_e2e_rejects_a_weight_outside_the_unit_interval():
    with pytest.raises(ValueError):
        E2ELoss(negative_weight=0.0)


# --- shared metric behaviour -----------------------------------------------------------


@pytest.mark.parametrize("name", METRIC)
@pytest.mark.parametrize("shape", [(3, 1, 4), (1, 3, 4), (6, 4)])
def test_metric_losses_reject_batches_without_positives_or_negatives(name, shape):
    with pytest.raises(ValueError):
        create_loss(name, embedding_dim=4)(torch.randn(*shape))


@pytest.mark.parametrize("name", ["pairwise-bce", "e2e", "ge2e-softmax", "ge2e-contrast"])
def test_scale_starts_at_ten_and_bias_at_minus_five(name):
    loss = create_loss(name, embedding_dim=4)
    assert loss.w.item() == pytest.approx(10.0)
    if loss.b is not None:
        assert loss.b.item() == -5.0


@pytest.mark.parametrize(
    "name, hyper",
    [
        ("pairwise-bce", {}),
        ("triplet", {"mining": "batch-hard"}),
        ("triplet", {"mining": "semi-hard"}),
        ("e2e", {}),
        ("ge2e-softmax", {}),
        ("ge2e-contrast", {}),
    ],
)
def test_training_separates_speakers(name, hyper):
    torch.manual_seed(0)
    table = torch.nn.Parameter(torch.randn(5, 4, 8))
    loss = create_loss(name, embedding_dim=8, **hyper)

    def separated():
        x = F.normalize(table.detach(), dim=-1)
        similarity = x @ F.normalize(x.mean(dim=1), dim=-1).T  # [5, 4, 5] against every centroid
        return bool((similarity.argmax(dim=-1) == torch.arange(5)[:, None]).all())

    assert not separated()
    optimiser = torch.optim.Adam([table, *loss.parameters()], lr=0.05)
    for _ in range(200):
        # Draw each speaker's utterances in a new order, as the sampler does: E2E scores only
        # the last one as a test, so with a fixed order the others would only be fitted on average.
        order = torch.rand(5, 4).argsort(dim=1)
        optimiser.zero_grad()
        loss(F.normalize(table[torch.arange(5)[:, None], order], dim=-1)).backward()
        optimiser.step()
    assert separated()


# --- distillation --------------------------------------------------------------------------


@pytest.mark.parametrize("metric", ["cosine", "mse"])
def test_distillation_is_zero_for_identical_embeddings(metric):
    x = F.normalize(torch.randn(6, 8), dim=-1)
    assert EmbeddingDistillationLoss(metric)(x, x.clone()).item() == pytest.approx(0.0, abs=1e-6)


def test_distillation_values_and_detached_teacher():
    student = torch.tensor([[1.0, 0.0], [1.0, 0.0]], requires_grad=True)
    teacher = torch.tensor([[0.0, 1.0], [1.0, 0.0]], requires_grad=True)
    cosine = EmbeddingDistillationLoss("cosine")(student, teacher)
    assert cosine.item() == pytest.approx(0.5)  # (1 - 0 + 1 - 1) / 2
    assert EmbeddingDistillationLoss("mse")(student, teacher).item() == pytest.approx(1.0)  # (2 + 0) / 2
    cosine.backward()
    assert teacher.grad is None and student.grad.abs().sum() > 0


def test_distillation_rejects_bad_arguments():
    with pytest.raises(ValueError, match="cosine"):
        EmbeddingDistillationLoss("l1")
    with pytest.raises(ValueError):
        EmbeddingDistillationLoss()(torch.randn(4, 3), torch.randn(4, 2))
