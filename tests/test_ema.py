"""The weights' moving average: hand-computed updates, swapping in and out, and the checkpoint round trip."""
import pytest
import torch

from flowgrpo.checkpoint import TrainState, load_checkpoint, save_checkpoint
from flowgrpo.ema import WeightEMA


def _model(value: float) -> torch.nn.Linear:
    m = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        m.weight.fill_(value)
    return m


def test_updates_follow_the_warmup_then_the_decay():
    m = _model(0.0)
    ema = WeightEMA(m, decay=0.5)
    expected = 0.0
    for n, w in enumerate([1.0, 2.0, 3.0, 4.0]):
        with torch.no_grad():
            m.weight.fill_(w)
        ema.update(m)
        d = min(0.5, (1 + n) / (10 + n))  # 0.1, 0.1818, 0.25, then the decay 0.5... capped at 0.5 from n = 8
        expected = d * expected + (1 - d) * w
        assert torch.allclose(ema.shadow["weight"], torch.full((1, 2), expected))
    assert ema.updates == 4


def test_applied_swaps_the_average_in_and_restores_the_live_weights():
    m = _model(1.0)
    ema = WeightEMA(m, decay=0.9)
    with torch.no_grad():
        m.weight.fill_(5.0)
    with ema.applied(m):
        assert torch.equal(m.weight, torch.full((1, 2), 1.0))
    assert torch.equal(m.weight, torch.full((1, 2), 5.0))
    with pytest.raises(RuntimeError), ema.applied(m):
        raise RuntimeError("an evaluation that fails")
    assert torch.equal(m.weight, torch.full((1, 2), 5.0))
    with pytest.raises(ValueError, match="decay"):
        WeightEMA(m, decay=1.0)


def test_checkpoint_round_trip_restores_the_average_exactly(tmp_path):
    m = _model(0.3)
    opt = torch.optim.AdamW(m.parameters())
    state = TrainState.fresh(0)
    state.ema = WeightEMA(m, decay=0.9)
    with torch.no_grad():
        m.weight.fill_(0.7)
    state.ema.update(m)
    save_checkpoint(tmp_path / "ck", m, opt, state)
    m2 = _model(0.0)
    ema2 = WeightEMA(m2, decay=0.9)
    restored = load_checkpoint(tmp_path / "ck", m2, torch.optim.AdamW(m2.parameters()), ema2)
    assert restored.ema is ema2 and ema2.updates == 1
    assert torch.equal(ema2.shadow["weight"], state.ema.shadow["weight"]) and torch.equal(m2.weight, m.weight)
    (tmp_path / "ck" / "ema.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="ema.safetensors"):
        load_checkpoint(tmp_path / "ck", m2, torch.optim.AdamW(m2.parameters()), ema2)
