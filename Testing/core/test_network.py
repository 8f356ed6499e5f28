"""The Q-network's and the localiser's 3-D convolution (``network.Conv3d``): oneDNN on the CPU for one small input,
with the results and the weights of ``nn.Conv3d``."""

import torch
from AgentRegistrationLib.core.network import Conv3d, DualStreamQNetwork, NetworkConfig
from AgentRegistrationLib.data.localiser import LocaliserConfig, OrganLocaliser
from torch import nn
from torch.profiler import profile


def _ops(run) -> set[str]:
    with profile() as prof:
        run()
    return {event.name for event in prof.events()}


def test_conv3d_takes_onednn_for_one_small_input_and_gives_nn_conv3d_results():
    torch.manual_seed(0)
    ours = Conv3d(4, 8, 3, stride=2, padding=1)
    theirs = nn.Conv3d(4, 8, 3, stride=2, padding=1)
    theirs.load_state_dict(ours.state_dict())  # the same parameters under the same names
    x = torch.randn(1, 4, 12, 30, 30)
    with torch.no_grad():
        assert "aten::slow_conv3d_forward" in _ops(lambda: theirs(x))  # what torch picks for this input
        assert _ops(lambda: ours(x)) >= {"aten::mkldnn_convolution"}
        assert "aten::slow_conv3d_forward" not in _ops(lambda: ours(x))
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-4, atol=1e-5)
    y = torch.randn(2, 4, 6, 10, 10, requires_grad=True)  # training: gradients as nn.Conv3d's
    ours(y).square().sum().backward()
    grad_ours = (y.grad.clone(), ours.weight.grad.clone())
    y.grad = None
    theirs(y).square().sum().backward()
    torch.testing.assert_close(grad_ours, (y.grad, theirs.weight.grad), rtol=1e-4, atol=1e-4)


def test_the_3d_networks_use_it_and_their_2d_twins_keep_torchs_conv2d():
    q3 = DualStreamQNetwork(NetworkConfig("compact", 3, (24, 24, 8), 6))
    q2 = DualStreamQNetwork(NetworkConfig("compact", 2, (24, 24), 6))
    loc3, loc2 = OrganLocaliser(LocaliserConfig(dim=3)), OrganLocaliser(LocaliserConfig(dim=2, grid=(48, 48)))
    for net in (q3, loc3):
        convs = [m for m in net.modules() if isinstance(m, nn.Conv3d)]
        assert convs and all(isinstance(m, Conv3d) for m in convs)
    for net in (q2, loc2):
        assert not any(isinstance(m, nn.Conv3d) for m in net.modules())
        assert any(type(m) is nn.Conv2d for m in net.modules())
