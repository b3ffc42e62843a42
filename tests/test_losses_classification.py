"""Classification losses: margins as the papers define them, head growth, and that each one trains."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from voiceprint.engine.losses import create_loss
from voiceprint.engine.losses.margins import AAMSoftmax, AMSoftmax, ASoftmax, MarginScheduler

NAMES = ["softmax", "a-softmax", "am-softmax", "aam-softmax", "subcenter-aam"]
MARGIN_NAMES = ["a-softmax", "am-softmax", "aam-softmax", "subcenter-aam"]


def cosines(embeddings, weight):
    return F.normalize(embeddings, dim=1) @ F.normalize(weight, dim=1).T


@pytest.mark.parametrize("easy_margin", [False, True])
def test_aam_without_margin_is_scaled_cosine_softmax(easy_margin):
    torch.manual_seed(0)
    loss = create_loss("aam-softmax", embedding_dim=8, num_classes=5, margin=0.0, easy_margin=easy_margin)
    x, y = torch.randn(16, 8), torch.randint(0, 5, (16,))
    expected = F.cross_entropy(loss.scale * cosines(x, loss.weight), y)
    torch.testing.assert_close(loss(x, y), expected, atol=1e-6, rtol=0)


def test_am_without_margin_is_scaled_cosine_softmax():
    torch.manual_seed(0)
    loss = create_loss("am-softmax", embedding_dim=8, num_classes=5, margin=0.0)
    x, y = torch.randn(16, 8), torch.randint(0, 5, (16,))
    expected = F.cross_entropy(loss.scale * cosines(x, loss.weight), y)
    torch.testing.assert_close(loss(x, y), expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", MARGIN_NAMES)
def test_margin_lowers_only_the_target_logit(name):
    torch.manual_seed(0)
    loss = create_loss(name, embedding_dim=8, num_classes=5)
    x, y = torch.randn(32, 8), torch.randint(0, 5, (32,))
    plain = loss.scale * loss.scores(x)
    margined = loss.logits(x, y)
    target = F.one_hot(y, 5).bool()
    assert (margined[target] < plain[target]).all()
    assert torch.equal(margined[~target], plain[~target])


def test_aam_target_logit_decreases_with_the_angle_past_pi_minus_m():
    loss = AAMSoftmax(embedding_dim=2, num_classes=1, margin=0.5)
    theta = torch.linspace(0, math.pi, 2001, dtype=torch.float64)
    target = loss.target_cosine(torch.cos(theta))
    assert (target.diff() < 0).all()
    # Below ~1e-3 rad the clamp on sin(theta) (there for finite gradients) shifts the value.
    inside = (theta > 1e-3) & (theta < math.pi - 0.5)
    torch.testing.assert_close(target[inside], torch.cos(theta[inside] + 0.5))


@pytest.mark.parametrize("m", [1, 2, 3, 4])
def test_a_softmax_psi_is_monotonic_and_matches_cos_m_theta(m):
    loss = ASoftmax(embedding_dim=2, num_classes=1, margin=m)
    theta = torch.linspace(0, math.pi, 2001, dtype=torch.float64)
    psi = loss.psi(torch.cos(theta))
    assert (psi.diff() < 0).all()
    torch.testing.assert_close(psi[[0, -1]], torch.tensor([1.0, 1.0 - 2 * m], dtype=torch.float64))
    first = theta <= math.pi / m
    torch.testing.assert_close(psi[first], torch.cos(m * theta[first]))


def test_a_softmax_lambda_anneals_to_its_floor():
    loss = ASoftmax(embedding_dim=2, num_classes=1)
    assert loss.lambda_ == loss.lambda_base
    for _ in range(10_000):
        loss.step()
    assert loss.lambda_ == loss.lambda_min
    clone = ASoftmax(embedding_dim=2, num_classes=1)
    clone.load_state_dict(loss.state_dict())
    assert clone.lambda_ == loss.lambda_min


def test_a_softmax_can_scale_by_the_embedding_norm():
    torch.manual_seed(0)
    loss = ASoftmax(embedding_dim=4, num_classes=3, scale=None, margin=1)
    x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
    # m = 1 makes psi = cos, so only the norm scaling remains.
    expected = x.norm(dim=1, keepdim=True) * cosines(x, loss.weight)
    torch.testing.assert_close(loss.logits(x, y), expected)


@pytest.mark.parametrize("name", NAMES)
def test_grow_keeps_old_rows_and_round_trips(name):
    torch.manual_seed(0)
    loss = create_loss(name, embedding_dim=6, num_classes=3)
    old = {k: v.clone() for k, v in loss.state_dict().items()}
    k = loss.rows_per_class

    loss.grow(4)
    init = torch.randn(2, 6)
    loss.grow(6, init=init)

    assert loss.num_classes == 6 and loss.weight.shape == (6 * k, 6)
    assert torch.equal(loss.weight[: 3 * k].detach(), old["weight"])
    # init fills the first (or only) row of each new class.
    assert torch.equal(loss.weight.detach()[4 * k :: k], init)
    if name == "softmax":
        assert torch.equal(loss.bias[:3].detach(), old["bias"])
        assert torch.equal(loss.bias[3:].detach(), torch.zeros(3))
    else:
        random_rows = loss.weight[3 * k : 4 * k].detach()
        torch.testing.assert_close(random_rows.norm(dim=1), torch.ones(k))

    x, y = torch.randn(8, 6), torch.arange(8) % 6
    clone = create_loss(name, embedding_dim=6, num_classes=6)
    clone.load_state_dict(loss.state_dict())
    assert torch.equal(clone(x, y), loss(x, y))

    with pytest.raises(ValueError):
        loss.grow(5)
    with pytest.raises(ValueError):
        loss.grow(8, init=torch.randn(3, 6))


@pytest.mark.parametrize("name", NAMES)
def test_bad_inputs_are_value_errors(name):
    loss = create_loss(name, embedding_dim=4, num_classes=3)
    with pytest.raises(ValueError):
        loss(torch.randn(2, 5), torch.tensor([0, 1]))
    with pytest.raises(ValueError):
        loss(torch.randn(2, 4), torch.tensor([0]))
    with pytest.raises(ValueError):
        loss(torch.randn(2, 4), torch.tensor([0, 3]))


@pytest.mark.parametrize("name", NAMES)
def test_degenerate_inputs_stay_finite(name):
    torch.manual_seed(0)
    hyper = {} if name == "softmax" else {"scale": 1e3}
    loss = create_loss(name, embedding_dim=4, num_classes=3, **hyper)
    rows = loss.weight.detach()[:: loss.rows_per_class]
    # Embeddings on top of their class row (cos -> 1) and a zero vector.
    x = torch.cat([rows * (1 + 1e-7), torch.zeros(1, 4)]).requires_grad_()
    y = torch.tensor([0, 1, 2, 0])
    value = loss(x, y)
    value.backward()
    assert torch.isfinite(value)
    assert torch.isfinite(x.grad).all() and torch.isfinite(loss.weight.grad).all()


def test_subcenter_scores_take_the_best_subcentre():
    torch.manual_seed(0)
    loss = create_loss("subcenter-aam", embedding_dim=5, num_classes=4, subcenters=3)
    x = torch.randn(10, 5)
    per_row = cosines(x, loss.weight).view(10, 4, 3)
    assert torch.equal(loss.scores(x), per_row.max(dim=2).values)
    # Moving one sub-centre onto an embedding makes that class's score ~1.
    with torch.no_grad():
        loss.weight[2 * 3 + 1] = x[0]
    torch.testing.assert_close(loss.scores(x)[0, 2], torch.tensor(1.0))


def test_margin_scheduler_ramps_then_holds():
    loss = create_loss("am-softmax", embedding_dim=4, num_classes=2)
    scheduler = MarginScheduler(loss, target=0.3, warmup_steps=10)
    seen = [loss.margin]
    for _ in range(15):
        scheduler.step()
        seen.append(loss.margin)
    assert seen[0] == 0.0
    assert all(b > a for a, b in zip(seen[:10], seen[1:11]))
    assert seen[10:] == [0.3] * 6
    torch.testing.assert_close(torch.tensor(seen[5]), torch.tensor(0.15))

    resumed = MarginScheduler(create_loss("aam-softmax", embedding_dim=4, num_classes=2), target=0.3,
                              warmup_steps=10, start_step=5)
    assert resumed.loss.margin == pytest.approx(0.15)
    assert MarginScheduler(loss, target=0.3, warmup_steps=0).loss.margin == 0.3


@pytest.mark.parametrize("name", ["softmax", "a-softmax"])
def test_margin_scheduler_refuses_losses_without_an_additive_margin(name):
    with pytest.raises(TypeError):
        MarginScheduler(create_loss(name, embedding_dim=4, num_classes=2), target=0.2, warmup_steps=5)


def noisy_clusters(classes=5, dim=8, per_class=30):
    generator = torch.Generator().manual_seed(0)
    centres = 2.0 * torch.randn(classes, dim, generator=generator)
    labels = torch.arange(classes).repeat_interleave(per_class)
    return centres[labels] + 0.5 * torch.randn(len(labels), dim, generator=generator), labels


@pytest.mark.parametrize(
    "name, hyper",
    [
        ("softmax", {}),
        ("a-softmax", {"margin": 1}),
        ("a-softmax", {"margin": 2}),
        ("a-softmax", {"margin": 3}),
        ("a-softmax", {"margin": 4}),
        ("am-softmax", {}),
        ("aam-softmax", {}),
        ("aam-softmax", {"easy_margin": True}),
        ("subcenter-aam", {}),
    ],
)
def test_each_loss_separates_noisy_clusters(name, hyper):
    torch.manual_seed(0)
    points, labels = noisy_clusters()
    held_out = torch.arange(len(labels)) % 3 == 0
    train_x, train_y = points[~held_out], labels[~held_out]
    net = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 8))
    loss = create_loss(name, embedding_dim=8, num_classes=5, **hyper)
    optimiser = torch.optim.Adam([*net.parameters(), *loss.parameters()], lr=1e-2)
    additive = isinstance(loss, (AMSoftmax, AAMSoftmax))
    scheduler = MarginScheduler(loss, target=loss.margin, warmup_steps=50) if additive else None

    for _ in range(200):
        optimiser.zero_grad()
        value = loss(F.normalize(net(train_x), dim=1), train_y)
        value.backward()
        optimiser.step()
        if scheduler is not None:
            scheduler.step()
        if isinstance(loss, ASoftmax):
            loss.step()

    assert torch.isfinite(value)
    # Nearest class weight, on the training points and on points never trained on.
    with torch.no_grad():
        predicted = loss.scores(F.normalize(net(points), dim=1)).argmax(dim=1)
    assert torch.equal(predicted, labels)
