"""harness.export: MAC counts, sparse linear kernels, channel surgery, compressed checkpoints, 2:4.

Timings are never asserted here (the machine is shared and noisy); ``python -m harness.bench``
measures the speed-ups (items g, h, i).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from torch import nn

from harness.export import (
    PrunedConv2d,
    ScatteredBatchNorm2d,
    ScatteredMaxPool2d,
    SparseLinear,
    compare_latency,
    count_macs,
    load_compressed,
    measure_latency,
    remove_pruned_channels,
    save_compressed,
    semi_structured_2to4,
    sparsify_linears,
)
from harness.models import DigitsCNN
from harness.pruning import Pruning


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _zero_random(layer: nn.Module, fraction: float, generator: torch.Generator) -> None:
    with torch.no_grad():
        layer.weight.mul_(torch.rand(layer.weight.shape, generator=generator) >= fraction)


def _zero_channels(layer: nn.Module, fraction: float) -> list[int]:
    """Zero the output channels with the smallest L1 norms, as prune=channel does."""
    with torch.no_grad():
        norms = layer.weight.flatten(1).abs().sum(1)
        gone = norms.argsort()[: round(fraction * len(norms))]
        layer.weight[gone] = 0
    return sorted(gone.tolist())


def _randomize_norms(model: nn.Module, generator: torch.Generator) -> None:
    """BatchNorm statistics and affine parameters far from their init, as after training."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=generator) * 0.3)
                m.running_var.copy_(torch.rand(n, generator=generator) * 1.5 + 0.5)
                m.weight.copy_(torch.rand(n, generator=generator) + 0.5)
                m.bias.copy_(torch.randn(n, generator=generator) * 0.3)


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * max(1.0, float(a.abs().max())))


# -- latency and MACs -------------------------------------------------------------------------


def test_latency_medians_are_positive_and_modes_restored():
    model = nn.Sequential(nn.Linear(16, 32), nn.Dropout(0.5), nn.Linear(32, 4)).train()
    other = copy.deepcopy(model).eval()
    x = torch.randn(8, 16)
    assert measure_latency(model, x, repeats=3, warmup=1) > 0
    ms_a, ms_b = compare_latency(model, other, (x,), rounds=3, warmup=1, threads=1)
    assert ms_a > 0 and ms_b > 0
    assert model.training and model[1].training and not other.training


def test_count_macs_counts_nonzero_weights_per_output_position():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5))
    with torch.no_grad():
        model[0].weight.view(-1)[:10] = 0  # 26 of 36 conv weights left
        model[3].weight.view(-1)[::7] = 0  # 720 - 103 = 617 linear weights left
    x = torch.randn(2, 1, 6, 6)
    dense, nonzero = count_macs(model, x)
    positions = 2 * 6 * 6  # batch 2, 6x6 output of every conv channel
    assert dense == positions * 36 + 2 * 720
    assert nonzero == positions * 26 + 2 * 617
    fast, _ = sparsify_linears(model, x, min_speedup=0.0, min_sparsity=0.1)
    assert isinstance(fast[3], SparseLinear)
    assert count_macs(fast, x) == (dense, nonzero)


# -- sparse linear kernels --------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["csr", "csr_mkl", "bsr"])
@pytest.mark.parametrize("bias", [True, False])
def test_sparse_linear_kinds_equal_dense(kind, bias):
    g = torch.Generator().manual_seed(1)
    linear = nn.Linear(32, 24, bias=bias)
    _zero_random(linear, 0.8, g)
    with torch.no_grad():
        linear.weight[3] = 0  # an empty row
        linear.weight[8:12, 4:8] = 1.5  # a full block
    layer = SparseLinear.from_linear(linear, kind, blocksize=4 if kind == "bsr" else None)
    with torch.no_grad():
        for x in (torch.randn(5, 32, generator=g), torch.randn(2, 3, 32, generator=g)):
            _close(layer(x), linear(x))
    torch.testing.assert_close(layer.weight, linear.weight.detach())
    assert layer.nnz == int(torch.count_nonzero(linear.weight)) or kind == "bsr"


def test_sparse_linear_csr_passes_gradients_to_its_input():
    linear = nn.Linear(16, 8)
    _zero_random(linear, 0.7, torch.Generator().manual_seed(2))
    layer = SparseLinear.from_linear(linear, "csr")
    x = torch.randn(4, 16, requires_grad=True)
    layer(x).sum().backward()
    x2 = x.detach().clone().requires_grad_()
    linear(x2).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad)


def test_sparsify_linears_equal_outputs_and_dense_layer_stays_dense():
    g = torch.Generator().manual_seed(3)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
                          nn.Linear(256, 10)).eval()
    _zero_random(model[1], 0.9, g)
    _zero_random(model[3], 0.95, g)  # model[5] stays dense
    before = copy.deepcopy(model.state_dict())
    x = torch.randn(16, 1, 8, 8, generator=g)

    fast, choices = sparsify_linears(model, x, min_speedup=0.0, rounds=2, warmup=1, threads=1)
    by_name = {c.name: c for c in choices}
    assert set(by_name) == {"1", "3", "5"}
    for name in ("1", "3"):
        assert by_name[name].kind in ("csr", "csr_mkl")  # unstructured: no square blocking is 50% full
        assert isinstance(fast.get_submodule(name), SparseLinear)
        assert {"dense", "csr", "csr_mkl"} <= set(by_name[name].times_ms)
        assert "bsr not timed" in by_name[name].reason or by_name[name].kind in by_name[name].reason
    assert by_name["5"].kind == "dense" and type(fast[5]) is nn.Linear
    assert "below min_sparsity" in by_name["5"].reason and by_name["5"].times_ms == {}
    assert by_name["3"].sparsity == pytest.approx(0.95, abs=0.01)
    with torch.no_grad():
        _close(fast(x), model(x))
    xg = x.clone().requires_grad_()
    fast(xg).sum().backward()  # gradients reach the input through the sparse kernels
    assert xg.grad is not None and xg.grad.abs().sum() > 0
    for key, value in model.state_dict().items():  # the original is untouched
        assert torch.equal(value, before[key])

    # a sparse kind must beat dense by min_speedup to be kept: an impossible bar keeps everything dense
    slow, choices = sparsify_linears(model, x, min_speedup=float("inf"), rounds=2, warmup=1)
    assert all(type(m) is not SparseLinear for m in slow.modules())
    assert all(c.reason.startswith("kept dense") for c in choices if c.name in ("1", "3"))


def test_sparsify_linears_times_bsr_for_block_sparse_weights():
    linear = nn.Linear(64, 64)
    with torch.no_grad():
        keep = torch.rand(8, 8, generator=torch.Generator().manual_seed(4)) > 0.8
        linear.weight.mul_(keep.repeat_interleave(8, 0).repeat_interleave(8, 1))
    x = torch.randn(4, 64)
    fast, (choice,) = sparsify_linears(nn.Sequential(linear), x, min_speedup=0.0, rounds=2, warmup=1)
    assert "bsr" in choice.times_ms
    with torch.no_grad():
        _close(fast(x), linear(x))


# -- channel surgery --------------------------------------------------------------------------


def test_remove_pruned_channels_digits_cnn_pruned_by_the_engine():
    torch.manual_seed(5)
    model = DigitsCNN()
    pruning = Pruning({"pattern": "channel", "target_sparsity": 0.5, "schedule": "one_shot",
                       "start_epoch": 0, "end_epoch": 0})
    pruning.attach(model, steps_per_epoch=1)
    pruning.on_train_begin()
    pruning.on_epoch_begin(0)
    model = pruning.finalize().eval()
    x = torch.randn(8, 1, 8, 8)

    small = remove_pruned_channels(model, x)
    assert small.features[0].out_channels == 16
    assert small.features[2].in_channels == 16 and small.features[2].out_channels == 32
    assert small.classifier[1].in_features == 32 * 4 * 4 and small.classifier[1].out_features == 64
    assert small.classifier[3].in_features == 64 and small.classifier[3].out_features == 10
    # zero filters keep their bias, so some removed channels were a non-zero constant: folded at the
    # zero-padded borders of the next conv, and into the bias of the linear layers
    assert isinstance(small.features[2], PrunedConv2d)
    assert _params(small) < 0.3 * _params(model)
    with torch.no_grad():
        _close(small(x), model(x))
        _close(small(x[:1]), model(x[:1]))
    small(x).sum().backward()  # still trainable: fine-tune the smaller model
    assert small.features[2].weight.grad is not None
    dense_macs, nonzero_macs = count_macs(model, x)
    assert count_macs(small, x)[0] < nonzero_macs < dense_macs


def test_remove_pruned_channels_sequential_with_batchnorm():
    g = torch.Generator().manual_seed(6)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3), nn.BatchNorm2d(16), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
        nn.Flatten(), nn.Linear(16, 12), nn.BatchNorm1d(12), nn.ReLU(), nn.Linear(12, 5),
    ).eval()
    _randomize_norms(model, g)
    _zero_channels(model[0], 0.5)
    _zero_channels(model[4], 0.25)
    _zero_channels(model[9], 0.5)
    x = torch.randn(4, 3, 14, 14, generator=g)

    small = remove_pruned_channels(model, x)
    assert [small[i].out_channels for i in (0, 4)] == [4, 12]
    assert small[1].num_features == 4 and small[5].num_features == 12 and small[10].num_features == 6
    assert small[9].in_features == 12 and small[12].in_features == 6
    assert not any(isinstance(m, PrunedConv2d) for m in small.modules())  # unpadded: bias folding
    with torch.no_grad():
        _close(small(x), model(x))


def test_remove_pruned_channels_resnet18_internal_channels():
    torch.manual_seed(7)
    g = torch.Generator().manual_seed(7)
    model = torchvision.models.resnet18(num_classes=10).eval()
    _randomize_norms(model, g)
    for name, m in model.named_modules():
        if name.startswith("layer") and name.endswith("conv1"):
            _zero_channels(m, 0.5)
    x = torch.randn(2, 3, 48, 48)

    small = remove_pruned_channels(model, x)
    for stage, width in zip((small.layer1, small.layer2, small.layer3, small.layer4), (64, 128, 256, 512)):
        for block in stage:
            assert block.conv1.out_channels == width // 2 and block.bn1.num_features == width // 2
            assert block.conv2.in_channels == width // 2 and block.conv2.out_channels == width
            assert isinstance(block.conv2, PrunedConv2d)  # relu(bn1 bias) constants at zero-padded borders
            assert block.bn2.num_features == width  # the residual stream keeps its width
    assert type(small.conv1) is nn.Conv2d and small.conv1.out_channels == 64
    assert _params(small) < 0.6 * _params(model)
    with torch.no_grad():
        _close(small(x), model(x))
        y = torch.randn(1, 3, 40, 56, generator=g)  # another input size: the border maps follow it
        _close(small(y), model(y))


def test_remove_pruned_channels_resnet18_every_conv_scatters_residual_outputs():
    """prune=channel's default selection zeroes filters of every conv, the residual stream's too."""
    torch.manual_seed(9)
    g = torch.Generator().manual_seed(9)
    model = torchvision.models.resnet18(num_classes=10).eval()
    _randomize_norms(model, g)
    zeroed = {name: _zero_channels(m, 0.5) for name, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    _zero_channels(model.layer4[1].conv2, 0.75)
    x = torch.randn(2, 3, 32, 32, generator=g)

    small = remove_pruned_channels(model, x)
    block = small.layer1[0]
    assert block.conv1.out_channels == 32 and block.conv2.in_channels == 32
    # The residual stream keeps its width: each conv feeding it computes its kept filters, the
    # channelwise modules after it (BatchNorm, the stem's max-pool) run on those channels only,
    # and the last of them scatters to the full width, the removed channels at their constants.
    for conv, scatters in ((small.conv1, small.maxpool), (block.conv2, block.bn2),
                           (small.layer2[0].downsample[0], small.layer2[0].downsample[1])):
        assert getattr(conv, "out_index", None) is None and conv.out_channels * 2 == scatters.full_out_channels
        assert isinstance(scatters, ScatteredBatchNorm2d | ScatteredMaxPool2d)
    assert small.bn1.num_features == 32 and block.bn2.num_features == 32
    assert block.bn2.out_index.tolist() == sorted(set(range(64)) - set(zeroed["layer1.0.conv2"]))
    assert small.layer4[1].conv2.out_channels == 128
    with torch.no_grad():
        _close(small(x), model(x))
        h = torch.randn(2, 32, 8, 8, generator=g)
        _close(small.maxpool(h[0]), small.maxpool(h)[0])  # unbatched input
        again = remove_pruned_channels(small, x)  # an exported model goes through again unchanged
        _close(again(x), model(x))
    assert count_macs(small, x)[0] < 0.8 * count_macs(model, x)[1]

    kept = remove_pruned_channels(model, x, scatter_outputs=None)
    assert type(kept.layer1[0].conv1) is nn.Conv2d and kept.layer1[0].conv1.out_channels == 32
    assert kept.layer1[0].conv2.out_channels == 64 and not hasattr(kept.conv1, "full_out_channels")
    with torch.no_grad():
        _close(kept(x), model(x))


def test_scattered_outputs_of_convs_with_bias_keep_the_zero_filters_bias():
    """A zero filter of a conv with a bias outputs that bias; scattered into the residual stream,
    its channel is filled with it (not with 0), so the sum with the skip path stays the same."""

    class Residual(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(6, 6, 3, padding=1, bias=True)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.relu(self.conv(x) + x)

    torch.manual_seed(3)
    model = Residual().eval()
    _zero_channels(model.conv, 0.5)
    with torch.no_grad():
        model.conv.bias.uniform_(0.5, 1.5)
    x = torch.randn(2, 6, 5, 7)
    small = remove_pruned_channels(model, x)
    assert isinstance(small.conv, PrunedConv2d) and small.conv.out_channels == 3
    with torch.no_grad():
        _close(small(x), model(x))
        _close(small.conv(x[0]), model.conv(x[0]))  # unbatched input


def test_remove_pruned_channels_leaves_an_unpruned_model_as_it_is():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3)).eval()
    x = torch.randn(2, 1, 6, 6)
    small = remove_pruned_channels(model, x)
    assert _params(small) == _params(model)
    with torch.no_grad():
        torch.testing.assert_close(small(x), model(x))


# -- compressed checkpoints -------------------------------------------------------------------


def test_compressed_checkpoint_round_trip_is_bit_exact(tmp_path):
    g = torch.Generator().manual_seed(8)
    model = nn.Sequential(nn.Linear(256, 256), nn.BatchNorm1d(256), nn.ReLU(), nn.Linear(256, 256))
    for layer in (model[0], model[3]):
        _zero_random(layer, 0.9, g)
    _randomize_norms(model, g)
    with torch.no_grad():
        model[0].weight[0, :3] = torch.tensor([-0.0, float("nan"), float("inf")])
    state = model.state_dict()
    state["extra.half"] = torch.zeros(1000, dtype=torch.float16).index_fill_(0, torch.tensor([3, 500]), 2.5)
    state["extra.ints"] = torch.arange(1, 11)
    state["extra.flags"] = torch.zeros(3000, dtype=torch.bool).index_fill_(0, torch.tensor([7]), True)
    state["extra.view"] = torch.randn(64, 64)[:8]  # a view into a larger storage
    path = tmp_path / "model.pt"

    report = save_compressed(state, path)
    loaded = load_compressed(path)
    assert list(loaded) == list(state)
    for name, tensor in state.items():
        got = loaded[name]
        assert got.dtype == tensor.dtype and got.shape == tensor.shape, name
        assert torch.equal(_bits(got), _bits(tensor)), name  # bit patterns: NaN and -0.0 too
    assert torch.signbit(loaded["0.weight"][0, 0])  # -0.0 stays -0.0
    # masking turns negative weights into -0.0: about half the pruned weights; their signs survive
    assert int(torch.signbit(state["3.weight"][state["3.weight"] == 0]).sum()) > 20_000
    assert report.kinds["0.weight"] == report.kinds["3.weight"] == "bitmask"
    assert report.kinds["0.bias"] == report.kinds["1.running_var"] == report.kinds["extra.ints"] == "dense"
    assert report.ratio < 0.3 and report.compressed_bytes < report.dense_bytes
    assert report.file_bytes < 0.35 * report.dense_bytes

    torch.load(path, weights_only=True)  # plain containers and tensors only
    fresh = copy.deepcopy(model)
    for p in fresh.parameters():
        nn.init.zeros_(p)
    save_compressed(model, tmp_path / "module.pt")
    fresh.load_state_dict(load_compressed(tmp_path / "module.pt"))
    for a, b in zip(fresh.state_dict().values(), model.state_dict().values()):
        assert torch.equal(_bits(a), _bits(b))


def test_load_compressed_rejects_other_files(tmp_path):
    torch.save({"weight": torch.ones(2)}, tmp_path / "plain.pt")
    with pytest.raises(ValueError, match="not a checkpoint written by"):
        load_compressed(tmp_path / "plain.pt")


# -- 2:4 semi-structured (CUDA) ---------------------------------------------------------------


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised without CUDA")
def test_semi_structured_2to4_needs_cuda():
    with pytest.raises(RuntimeError, match="needs a CUDA GPU"):
        semi_structured_2to4(nn.Sequential(nn.Linear(64, 64)))


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 0),
                    reason="2:4 sparse kernels need a CUDA GPU of compute capability 8.0+")
def test_semi_structured_2to4_on_cuda():
    from torch.sparse import SparseSemiStructuredTensor

    model = nn.Sequential(nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 128)).cuda().half().eval()
    with torch.no_grad():
        model[0].weight.mul_(torch.tensor([0, 1, 1, 0], device="cuda", dtype=torch.half).repeat(128, 32))
    x = torch.randn(64, 128, device="cuda", dtype=torch.half)
    fast = semi_structured_2to4(model)
    assert isinstance(fast[0].weight, SparseSemiStructuredTensor)
    assert not isinstance(fast[2].weight, SparseSemiStructuredTensor)  # dense: not 2:4
    with torch.no_grad():
        torch.testing.assert_close(fast(x), model(x), rtol=1e-2, atol=1e-2)
