"""The weights' moving average: hand-computed updates, swapping in and out, and the checkpoint round trip."""
import pytest
import torch

from flowgrpo.checkpoint import CheckpointError, TrainState, read_training, training_files, write_checkpoint_dir
from flowgrpo.policies.ema import WeightEMA
from flowgrpo.policies.state import load_trainable, trainable_state_dict


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
    ema = WeightEMA(m, decay=0.9)
    with torch.no_grad():
        m.weight.fill_(0.7)
    ema.update(m)
    write_checkpoint_dir(tmp_path / "ck", training_files(trainable_state_dict(m), opt.state_dict(),
                                                         TrainState(iteration=1), kind="test", config={},
                                                         ema=ema.shadow))
    loaded = read_training(tmp_path / "ck", kind="test")
    m2 = _model(0.0)
    ema2 = WeightEMA(m2, decay=0.9)
    ema2.load(loaded.ema, updates=loaded.state.iteration)
    load_trainable(m2, loaded.weights, "ck")
    assert ema2.updates == 1
    assert torch.equal(ema2.shadow["weight"], ema.shadow["weight"]) and torch.equal(m2.weight, m.weight)
    with pytest.raises(ValueError, match="its weight EMA does not match"):
        ema2.load({"bias": torch.zeros(1)}, updates=1)
    (tmp_path / "ck" / "ema.safetensors").unlink()
    with pytest.raises(CheckpointError, match="ema.safetensors is missing"):
        read_training(tmp_path / "ck", kind="test")
