import pytest
import torch

from demandstream.model.training.averaging import WeightAverage


def _net(value: float) -> torch.nn.Linear:
    net = torch.nn.Linear(2, 1)
    with torch.no_grad():
        net.weight.fill_(value)
        net.bias.fill_(value)
    return net


def test_the_average_is_the_exponential_moving_average_of_the_iterates():
    net, d = _net(0.0), 0.9
    avg = WeightAverage(net, d)
    expected = 0.0
    for w in [1.0, 2.0, -3.0, 0.5]:
        with torch.no_grad():
            net.weight.fill_(w)
            net.bias.fill_(w)
        avg.update()
        expected = d * expected + (1 - d) * w
    with avg.swapped():
        assert net.weight.flatten().tolist() == pytest.approx([expected] * 2)
        assert net.bias.item() == pytest.approx(expected)
    assert net.weight.flatten().tolist() == [0.5, 0.5]  # the iterate is back


def test_the_iterate_comes_back_even_when_the_block_fails():
    net = _net(1.0)
    avg = WeightAverage(net, 0.5)
    with torch.no_grad():
        net.weight.fill_(3.0)
    with pytest.raises(RuntimeError), avg.swapped():
        raise RuntimeError("validation failed")
    assert net.weight.flatten().tolist() == [3.0, 3.0]


def test_install_keeps_the_average_and_buffers_are_untouched():
    net = torch.nn.BatchNorm1d(2)
    net.running_mean.fill_(7.0)
    avg = WeightAverage(net, 0.5)
    with torch.no_grad():
        net.weight.fill_(3.0)  # starts at 1
    avg.update()
    avg.install()
    assert net.weight.tolist() == [2.0, 2.0] and net.running_mean.tolist() == [7.0, 7.0]


@pytest.mark.parametrize("decay", [0.0, 1.0, -0.5])
def test_a_decay_outside_the_open_unit_interval_is_refused(decay):
    with pytest.raises(ValueError, match="decay"):
        WeightAverage(_net(0.0), decay)
