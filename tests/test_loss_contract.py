"""One contract for every registered loss: shapes, finiteness, gradients, constraints."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from voiceprint.engine.losses import LOSSES, create_loss

NAMES = LOSSES.names()
CLASSES, DIM = 3, 3


def build(name: str, dtype=torch.float32, **hyper):
    torch.manual_seed(0)
    return create_loss(name, embedding_dim=DIM, num_classes=CLASSES, **hyper).to(dtype)


def inputs(loss, dtype=torch.float32, *, near_duplicates=False, requires_grad=True):
    """Small random inputs of the shape the loss's kind expects."""
    generator = torch.Generator().manual_seed(1)
    shape = {"classification": (4, DIM), "metric": (3, 2, DIM), "distillation": (4, DIM)}[loss.kind]
    x = torch.randn(*shape, generator=generator, dtype=dtype)
    if near_duplicates:
        x = x[..., :1, :].expand_as(x) + 1e-7 * x if loss.kind == "metric" else x[:1].expand_as(x) + 1e-7 * x
    x = F.normalize(x, dim=-1).detach().requires_grad_(requires_grad)
    if loss.kind == "classification":
        return (x, torch.tensor([0, 1, 2, 1]))
    if loss.kind == "distillation":
        return (x, F.normalize(torch.randn(*shape, generator=generator, dtype=dtype), dim=-1))
    return (x,)


@pytest.mark.parametrize("name", NAMES)
def test_loss_and_gradients_are_finite(name):
    loss = build(name)
    args = inputs(loss)
    value = loss(*args)
    assert value.dim() == 0 and torch.isfinite(value)
    value.backward()
    assert torch.isfinite(args[0].grad).all()
    assert args[0].grad.abs().sum() > 0, "the embeddings received no gradient"


@pytest.mark.parametrize("name", NAMES)
def test_gradcheck_float64(name):
    loss = build(name, torch.float64)
    args = inputs(loss, torch.float64)
    assert torch.autograd.gradcheck(lambda x: loss(x, *args[1:]), (args[0],), eps=1e-6, atol=1e-4)


@pytest.mark.parametrize("name", NAMES)
def test_near_duplicate_embeddings_give_no_nan(name):
    loss = build(name)
    args = inputs(loss, near_duplicates=True)
    value = loss(*args)
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(args[0].grad).all()


@pytest.mark.parametrize("name", [n for n in NAMES if hasattr(build(n), "scale")])
def test_very_large_scale_gives_no_nan(name):
    loss = build(name, scale=1e3)
    args = inputs(loss)
    value = loss(*args)
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(args[0].grad).all()


@pytest.mark.parametrize("name", NAMES)
def test_every_learnable_parameter_gets_a_gradient(name):
    loss = build(name)
    loss(*inputs(loss)).backward()
    for pname, param in loss.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), pname
        assert param.grad.abs().sum() > 0, f"{pname} received a zero gradient"


@pytest.mark.parametrize("name", [n for n in NAMES if hasattr(build(n), "w")])
@pytest.mark.parametrize("direction", [1.0, -1.0])
def test_scale_w_stays_positive(name, direction):
    loss = build(name)
    optimiser = torch.optim.SGD(loss.parameters(), lr=10.0)
    for _ in range(30):
        optimiser.zero_grad()
        (direction * loss(*inputs(loss, requires_grad=False))).backward()
        optimiser.step()
    assert (loss.w > 0).all()


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_round_trip(name):
    loss = build(name)
    with torch.no_grad():  # move away from the seeded initial values a fresh build would repeat
        for param in loss.parameters():
            param.add_(0.1 * torch.randn_like(param))
    clone = build(name)
    clone.load_state_dict(loss.state_dict())
    args = inputs(loss, requires_grad=False)
    assert torch.equal(loss(*args), clone(*args))


def test_unknown_loss_lists_the_valid_names():
    from voiceprint.engine.errors import UnknownName

    with pytest.raises(UnknownName, match="ge2e-softmax"):
        create_loss("arcface-typo", embedding_dim=DIM)
