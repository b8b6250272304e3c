"""Bad days: prompt files with categories of their own, rewards that score nothing, a disk that fills up mid-save."""
import json
import math
import os
import resource
import signal
import subprocess
import sys
import threading
import time
from collections import Counter

import pytest
import torch
from safetensors.torch import load_file

from flowgrpo.checkpoint import read_training
from flowgrpo.config import ConfigError, TrainConfig
from flowgrpo.prompts.shapes import load_split
from flowgrpo.rewards import Reward, register_reward
from flowgrpo.rewards.server import make_server
from flowgrpo.train import draw_prompts, train
from flowgrpo.trainer import UnscorableError

# Shapes entries sorted into categories of a user's own, T2I-CompBench style
CATEGORIES = {"single_object": "objects", "two_object": "objects", "counting": "numeracy", "colors": "attributes",
              "color_attr": "attributes", "position": "spatial"}


def _recategorised(path, entries):
    path.write_text("".join(json.dumps(e | {"tag": CATEGORIES[e["tag"]]}) + "\n" for e in entries))
    return str(path)


def _cfg(model, out, **kw):
    base = dict(model=str(model), out=str(out), prompts_per_iter=4, group_size=4, micro_batch=8, num_steps=3,
                sde_steps=2, eval_num_steps=2, eval_images_per_prompt=1, eval_every=100, save_every=1, log_with="",
                max_minutes=0)
    return TrainConfig(**(base | kw))


def test_prompt_file_with_its_own_tags_trains_and_samples_every_tag(tiny_model, tmp_path):
    prompts = _recategorised(tmp_path / "train.jsonl", load_split("train"))
    evalp = _recategorised(tmp_path / "eval.jsonl", load_split("test")[::20])
    cfg = _cfg(tiny_model, tmp_path / "run", prompts=prompts, eval_prompts=evalp, iterations=2,
               tag_weights={"spatial": 2})
    summary = train(cfg)
    tags = {"objects", "numeracy", "attributes", "spatial"}
    assert set(summary["base"]["accuracy"]) == tags | {"overall"}  # GenEval scoring, reported per category
    history = read_training(tmp_path / "run" / "checkpoints" / "iter-000002", kind="flow").state.history["train"]
    sampled = {k.split("/", 1)[1] for h in history for k in h if k.startswith("reward/")}
    assert sampled <= tags and len(sampled) >= 3
    report = (tmp_path / "run" / "report.md").read_text()
    assert all(f"| {t} |" in report for t in tags)  # failure reasons per category
    from flowgrpo.prompts.loaders import load_prompts
    drawn = Counter(e["tag"] for it in range(300) for e in draw_prompts(load_prompts(prompts), cfg, it))
    assert set(drawn) == tags
    assert drawn["spatial"] / sum(drawn.values()) == pytest.approx(2 / 5, abs=0.03)  # weight 2 of 1 + 1 + 1 + 2
    with pytest.raises(ConfigError, match=r"tag_weights: unknown tag\(s\) \['counting'\]; tags are attributes, numeracy, objects, spatial"):
        train(_cfg(tiny_model, tmp_path / "bad", prompts=prompts, eval_prompts=evalp, tag_weights={"counting": 2}))
    assert not (tmp_path / "bad").exists()


class Flaky(Reward):
    """A reward that cannot score anything on the calls listed (like a reward server that is down)."""

    name = "flaky"

    def __init__(self, down: str = ""):
        super().__init__()
        self.down, self.calls = {int(c) for c in down.split(",") if c}, 0

    def score(self, images, prompts, metadata):
        self.calls += 1
        if self.calls in self.down:
            return torch.full((len(prompts),), math.nan)
        return images.mean(dim=(1, 2, 3))


register_reward("flaky", Flaky, overwrite=True)


def test_an_unscorable_iteration_is_skipped_and_too_many_in_a_row_stop_the_run(tiny_model, tmp_path, capsys):
    # the eval prompts are GenEval entries, scored by the verifier: the reward is called once per iteration
    evalp = tmp_path / "eval.jsonl"
    evalp.write_text("".join(json.dumps(e) + "\n" for e in load_split("test")[::60]))
    kw = dict(judge="", reward="flaky", eval_prompts=str(evalp), max_unscorable=2, keep=5)
    # training calls: 1 scored, 2 all NaN (skipped), 3 scored (the streak resets), 4 and 5 all NaN: stop
    with pytest.raises(UnscorableError, match=r"2 consecutive iterations had no scorable sample .* The last "
                                              r"checkpoint is intact"):
        train(_cfg(tiny_model, tmp_path / "run", iterations=8, reward_options={"down": "2,4,5"}, **kw))
    err = capsys.readouterr().err
    assert "iteration 2: no sample could be scored; update skipped (1 in a row, the run stops at 2)" in err
    ck = tmp_path / "run" / "checkpoints"
    state = read_training(ck / "iter-000004", kind="flow").state
    assert [h.get("skipped", 0.0) for h in state.history["train"]] == [0.0, 1.0, 0.0, 1.0]
    assert state.unscorable_streak == 1
    w2, w3 = (load_file(ck / f"iter-00000{i}" / "weights.safetensors") for i in (2, 3))
    w4 = load_file(ck / "iter-000004" / "weights.safetensors")
    assert all(torch.equal(w3[k], w4[k]) for k in w3)  # a skipped update changes nothing
    assert any(not torch.equal(w2[k], w3[k]) for k in w2)  # a scored one does


def test_a_full_disk_during_a_save_keeps_the_previous_checkpoint(tiny_model, tmp_path, capsys):
    """A run that may write small files only (RLIMIT_FSIZE, as on a full disk: EFBIG instead of ENOSPC): its
    first checkpoint fails with a one-line error, and the first run's checkpoint stays complete and resumable."""
    evalp = tmp_path / "eval.jsonl"
    evalp.write_text("".join(json.dumps(e) + "\n" for e in load_split("test")[::60]))
    options = dict(prompts_per_iter=2, group_size=4, micro_batch=8, num_steps=3, eval_prompts=str(evalp),
                   eval_num_steps=1)
    train(_cfg(tiny_model, tmp_path / "run", iterations=1, **options))
    weights = (tmp_path / "run" / "checkpoints" / "iter-000001" / "weights.safetensors").stat().st_size

    def small_files_only():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a too-large write then fails with EFBIG, like ENOSPC
        resource.setrlimit(resource.RLIMIT_FSIZE, (weights // 2, weights // 2))

    args = [sys.executable, "-m", "flowgrpo.cli", "train", "--model", str(tiny_model), "--out", str(tmp_path / "run"),
            "--iterations", "2", "--log-with", "", "--max-minutes", "0", "--save-every", "1",
            "--eval-images-per-prompt", "1", "--eval-every", "100", "--sde-steps", "2"]
    args += [a for k, v in options.items() for a in (f"--{k.replace('_', '-')}", str(v))]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300, preexec_fn=small_files_only)
    assert done.returncode == 2
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("flowgrpo train: error: could not write checkpoint") and "iter-000002" in last
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["iter-000001"]
    assert read_training(tmp_path / "run" / "checkpoints" / "iter-000001", kind="flow").state.iteration == 1
    capsys.readouterr()
    train(_cfg(tiny_model, tmp_path / "run", iterations=2, **options))
    assert "resumed from" in capsys.readouterr().out


class GoesDown(Reward):
    """Mean pixel value; on its ``last`` call it asks the test to stop the server that serves it."""

    name = "goes_down"

    def __init__(self, last: int, stopping):
        super().__init__()
        self.last, self.stopping, self.calls = last, stopping, 0

    def score(self, images, prompts, metadata):
        self.calls += 1
        if self.calls == self.last:
            self.stopping.set()
            time.sleep(0.5)  # the listening socket closes before this answer leaves: the next request is refused
        return images.mean(dim=(1, 2, 3))


def test_a_reward_server_that_dies_mid_run_is_skipped_then_stops_the_run(tiny_model, tmp_path, capsys, caplog):
    stopping = threading.Event()
    server = make_server(GoesDown(last=2, stopping=stopping)).start()
    threading.Thread(target=lambda: stopping.wait() and server.close(), daemon=True).start()
    evalp = tmp_path / "eval.jsonl"
    evalp.write_text("".join(json.dumps(e) + "\n" for e in load_split("test")[::60]))
    remote = {"url": server.url, "retries": 2, "backoff": 0.05, "timeout": 5}
    # iterations 1 and 2 are scored by the server, 3 and 4 find it gone: skipped, then the run stops
    with pytest.raises(UnscorableError, match=r"2 consecutive iterations had no scorable sample"):
        train(_cfg(tiny_model, tmp_path / "run", iterations=8, judge="", reward="remote", reward_options=remote,
                   eval_prompts=str(evalp), max_unscorable=2, keep=5))
    assert "iteration 3: no sample could be scored; update skipped (1 in a row, the run stops at 2)" in \
        capsys.readouterr().err
    failed = [r.getMessage() for r in caplog.records if "scored NaN" in r.getMessage()]
    assert len(failed) == 2 and "16 sample(s) scored NaN (1 failed request(s) so far)" in failed[0]
    ck = tmp_path / "run" / "checkpoints"
    state = read_training(ck / "iter-000003", kind="flow").state  # the newest checkpoint, complete
    assert [h.get("skipped", 0.0) for h in state.history["train"]] == [0.0, 0.0, 1.0]
    assert not (ck / "iter-000004").exists()
    w2, w3 = (load_file(ck / f"iter-00000{i}" / "weights.safetensors") for i in (2, 3))
    assert all(torch.equal(w2[k], w3[k]) for k in w2)  # the skipped iteration trained on nothing
