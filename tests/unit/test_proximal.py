import torch

from wardround.client.proximal import proximal_term, snapshot_trainable


def test_proximal_term_is_half_mu_squared_distance():
    p = torch.tensor([1.0, 2.0], requires_grad=True)
    anchor = {"p": torch.tensor([0.0, 0.0])}
    term = proximal_term([("p", p)], anchor, mu=0.5)
    # 0.5/2 * (1 + 4) = 1.25 — squared, not a plain norm
    assert term.item() == 1.25
    term.backward()
    # gradient mu * (w - w_global)
    torch.testing.assert_close(p.grad, torch.tensor([0.5, 1.0]))


def test_proximal_term_zero_at_anchor_and_for_zero_mu():
    p = torch.tensor([3.0])
    assert proximal_term([("p", p)], {"p": p.clone()}, mu=1.0).item() == 0.0
    assert proximal_term([("p", p)], {"p": torch.zeros(1)}, mu=0.0).item() == 0.0


def test_snapshot_takes_only_trainable_parameters():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
    model[0].weight.requires_grad_(False)
    snap = snapshot_trainable(model)
    assert set(snap) == {"0.bias", "1.weight", "1.bias"}
    model[1].weight.data.add_(1.0)
    assert not torch.equal(snap["1.weight"], model[1].weight)
