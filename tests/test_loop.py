"""The one training loop (calibkit.loop): one optimizer step per batch, the schedule applied after each step."""

import pytest
import torch
import torch.nn.functional as F

from calibkit.loop import lr_multiplier, train_steps


def _loss(model, x, y):
    logits = model(x)
    return F.cross_entropy(logits, y), logits


def test_one_step_per_batch_with_the_scheduled_lr():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    batches = [(torch.randn(8, 4), torch.randint(0, 3, (8,))) for _ in range(5)]
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    steps = list(train_steps(model, batches, _loss, opt, lambda i: lr_multiplier(i, 5, 2), total=5, progress=False))
    assert [s.index for s in steps] == [1, 2, 3, 4, 5]
    assert [s.lr for s in steps] == pytest.approx([0.5 * lr_multiplier(i, 5, 2) for i in range(5)])
    assert all(not s.loss.requires_grad and s.logits.shape == (8, 3) for s in steps)
    assert all(torch.equal(s.labels, b[1]) for s, b in zip(steps, batches))


def test_the_same_as_a_hand_written_loop():
    torch.manual_seed(0)
    batches = [(torch.randn(8, 4), torch.randint(0, 3, (8,))) for _ in range(3)]
    a, b = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
    b.load_state_dict(a.state_dict())
    opt_a = torch.optim.SGD(a.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    for _ in train_steps(a, batches, _loss, opt_a, lambda i: 1.0, total=3, progress=False):
        pass
    opt_b = torch.optim.SGD(b.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    for x, y in batches:
        loss = F.cross_entropy(b(x), y)
        opt_b.zero_grad()
        loss.backward()
        opt_b.step()
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_cosine_and_linear_decay_and_bad_shape():
    assert lr_multiplier(0, 10, 4) == pytest.approx(0.25)
    assert lr_multiplier(4, 10, 4) == pytest.approx(1.0) == lr_multiplier(4, 10, 4, "cosine")
    assert lr_multiplier(7, 10, 4) == pytest.approx(0.5) == lr_multiplier(7, 10, 4, "cosine")
    assert lr_multiplier(10, 10, 4) == 0.0 and lr_multiplier(10, 10, 4, "cosine") == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="decay='step' is unknown"):
        lr_multiplier(0, 10, 4, "step")
