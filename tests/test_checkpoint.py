"""The checkpoint directory: complete or absent, checked on read, the newest complete one found, old ones retired."""
import json
import os

import pytest
import torch

from flowgrpo.checkpoint import (MARKER, CheckpointDir, CheckpointError, TrainState, read_training, training_files,
                                 verify_checkpoint_dir, write_checkpoint_dir)


def _files(iteration: int, value: float = 1.0):
    return training_files({"w": torch.full((3,), value)}, {"state": {}, "param_groups": []},
                          TrainState(iteration=iteration), kind="test", config={"seed": 0})


def test_written_checkpoints_are_complete_and_read_back(tmp_path):
    path = write_checkpoint_dir(tmp_path / "iter-000003", _files(3, 2.5))
    assert sorted(p.name for p in path.iterdir()) == [MARKER, "optimizer.pt", "state.json", "weights.safetensors"]
    manifest = json.loads((path / MARKER).read_text())
    assert manifest["files"]["weights.safetensors"]["bytes"] == (path / "weights.safetensors").stat().st_size
    loaded = read_training(path, kind="test")
    assert loaded.state.iteration == 3 and torch.equal(loaded.weights["w"], torch.full((3,), 2.5))
    assert not (tmp_path / "iter-000003.tmp").exists()


@pytest.mark.parametrize(("damage", "message"), [
    (lambda p: (p / "weights.safetensors").write_bytes((p / "weights.safetensors").read_bytes()[:-7]),
     r"weights.safetensors is corrupt \(\d+ bytes, \d+ written; checksum differs\)"),  # truncated
    (lambda p: (p / "state.json").write_text((p / "state.json").read_text().replace('"iteration": 3', '"iteration": 4')),
     "state.json is corrupt"),  # same size, other bytes
    (lambda p: (p / "optimizer.pt").unlink(), "optimizer.pt is missing"),
    (lambda p: (p / MARKER).unlink(), "is not a complete checkpoint"),
    (lambda p: (p / MARKER).write_text("{"), "unreadable COMPLETE manifest"),
])
def test_damaged_checkpoints_are_refused_naming_the_file(tmp_path, damage, message):
    path = write_checkpoint_dir(tmp_path / "iter-000003", _files(3))
    damage(path)
    with pytest.raises(CheckpointError, match=message):
        read_training(path, kind="test")


def test_a_foreign_checkpoint_is_refused(tmp_path):
    path = write_checkpoint_dir(tmp_path / "ck", _files(1))
    with pytest.raises(CheckpointError, match="is a 'test' checkpoint; this trainer resumes 'flow' ones"):
        read_training(path, kind="flow")
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "model.safetensors").write_bytes(b"\0" * 8)
    with pytest.raises(CheckpointError, match="no COMPLETE marker"):
        verify_checkpoint_dir(plain)


def test_the_newest_complete_checkpoint_is_found_and_old_ones_retired(tmp_path):
    ck = CheckpointDir(tmp_path / "checkpoints", keep=2)
    assert ck.newest() is None
    for it in (2, 4):
        ck.save(it, _files(it))
    (tmp_path / "checkpoints" / "iter-000006").mkdir()  # a kill between mkdir and the marker of another writer
    (tmp_path / "checkpoints" / "iter-000007.tmp").mkdir()  # a kill during a save
    assert ck.newest().name == "iter-000004"
    ck.save(8, _files(8))
    assert [p.name for p in ck.complete()] == ["iter-000004", "iter-000008"]  # keep = 2
    assert not (tmp_path / "checkpoints" / "iter-000007.tmp").exists()
    assert not (tmp_path / "checkpoints" / "iter-000002").exists()


def test_a_failed_write_leaves_the_previous_checkpoint_and_no_debris(tmp_path):
    ck = CheckpointDir(tmp_path, keep=2)
    ck.save(1, _files(1))

    def full_disk(path):
        path.write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    with pytest.raises(CheckpointError, match=r"could not write checkpoint .*iter-000002: OSError: .*No space left"):
        ck.save(2, _files(2) | {"weights.safetensors": full_disk})
    assert [p.name for p in ck.complete()] == ["iter-000001"] and sorted(os.listdir(tmp_path)) == ["iter-000001"]
    assert read_training(ck.newest(), kind="test").state.iteration == 1
