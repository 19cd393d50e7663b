"""The weight average behind GRPO's and PPO's ``--ema``: its arithmetic, the swap used by mid-run
evaluations, and the end-of-run copy."""
import pytest
import torch

from tinyseek.post.ema import WeightEMA, averaged, swapped


def test_swapped_puts_values_in_and_restores_exactly():
    """The mid-run evaluation of an --ema run scores the averaged weights: ``swapped`` puts them in for
    the block and restores the raw ones bit for bit afterwards, also when the block raises."""
    params = [torch.nn.Parameter(torch.randn(3, 4)), torch.nn.Parameter(torch.randn(5))]
    raw = [p.detach().clone() for p in params]
    avg = [torch.zeros(3, 4), torch.ones(5)]
    with swapped(params, avg):
        assert all(torch.equal(p, v) for p, v in zip(params, avg))
    assert all(torch.equal(p, r) for p, r in zip(params, raw))
    with pytest.raises(RuntimeError):
        with swapped(params, avg):
            raise RuntimeError("evaluation failed")
    assert all(torch.equal(p, r) for p, r in zip(params, raw))
    with swapped(params, None):  # no --ema: nothing changes
        assert all(torch.equal(p, r) for p, r in zip(params, raw))


def test_weight_ema_follows_the_closed_form_and_becomes_the_weights():
    """Two updates with decay d after the weights moved to w1 then w2: shadow = d^2 w0 + d(1-d) w1 + (1-d) w2;
    applied() shows it and restores the weights; copy_to() makes it the weights."""
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    d = 0.75
    ema = WeightEMA([p], d)
    w0 = p.detach().clone()
    w1, w2 = torch.tensor([3.0, 0.0]), torch.tensor([-1.0, 4.0])
    for w in (w1, w2):
        with torch.no_grad():
            p.copy_(w)
        ema.update()
    want = d * d * w0 + d * (1 - d) * w1 + (1 - d) * w2
    torch.testing.assert_close(ema.shadow[0], want)
    with averaged(ema):
        torch.testing.assert_close(p.detach(), want)
    assert torch.equal(p.detach(), w2)
    with averaged(None):
        assert torch.equal(p.detach(), w2)
    ema.copy_to()
    torch.testing.assert_close(p.detach(), want)


@pytest.mark.parametrize("decay", [0.0, 1.0, -0.5])
def test_weight_ema_refuses_a_decay_outside_0_1(decay):
    with pytest.raises(ValueError, match="decay"):
        WeightEMA([torch.nn.Parameter(torch.zeros(2))], decay)
