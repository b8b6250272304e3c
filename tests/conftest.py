import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Tiny models: one thread is faster than two (threading overhead) and robust to a busy machine.
torch.set_num_threads(int(os.environ.get("FLOWGRPO_TEST_THREADS", "1")))

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture
def shared_data() -> Path:
    """The real benchmark files beside the checkout (absent in a user's clone)."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real benchmark data not found at {SHARED_DATA} (only present on the developers' machines)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A one-layer Shapes flow pipeline built from config (seeded), shared by the strategy tests."""
    from flowgrpo.pretrain.model import TransformerSpec, build_pipeline

    path = tmp_path_factory.mktemp("tiny-shapes")
    build_pipeline(TransformerSpec(num_layers=1, attention_head_dim=8, num_attention_heads=2), seed=0).save_pretrained(path)
    return path
