"""Iterations that do only the model work their maths needs, without changing the maths: G²RPO evaluates a group as
one row up to its branch point (the same samples as row by row, counted forward passes), deterministic steps run both
CFG branches in one call, and every strategy still recomputes its log-probs exactly (ratio 1 in fp32 and bf16)."""
import math

import pytest
import torch

from flowgrpo.config import TrainConfig
from flowgrpo.policies.flow import FlowPolicy
from flowgrpo.prompts.shapes import load_split
from flowgrpo.strategies import FlowStrategy
from tests.helpers import flow_trainer, make_plan, strategy_of

PROMPTS = load_split("train")[:3]  # Shapes entries (GenEval metadata for the verifier reward)


def _cfg(model, tmp_path, **kw):
    base = dict(model=str(model), out=str(tmp_path), log_with="", prompts_per_iter=3, group_size=4, micro_batch=4,
                num_steps=5, sde_steps=3, judge="", reward="shapes", beta=0.1)
    return TrainConfig(**(base | kw))


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("strategy, extra", [
    ("flow_grpo", {}), ("dance_grpo", {"strategy_options": {"timestep_fraction": 0.5}}), ("g2rpo", {}),
    ("g2rpo", {"antithetic": True, "noise_freqs": 2, "strategy_options": {"granularities": 2}}),
    ("g2rpo", {"schedule_jitter": 2}), ("mixgrpo", {"strategy_options": {"window_shift_every": 1}}),
    ("mixgrpo", {"strategy_options": {"ode_solver": "dpm2", "ode_compress": 0.5}}),
    ("dense_grpo", {"strategy_options": {"calibrate_iterations": 1}}),
])
def test_every_strategy_recomputes_its_sampled_log_probs_exactly(tiny_model, tmp_path, precision, strategy, extra):
    trainer = flow_trainer(_cfg(tiny_model, tmp_path, strategy=strategy, precision=precision, **extra))
    for _ in range(2):  # the second iteration samples with the updated policy (and DenseGRPO's calibrated noise)
        m = trainer.step(PROMPTS)
        assert abs(m["ratio_min"] - 1) < 1e-5 and abs(m["ratio_max"] - 1) < 1e-5
        assert m["sampler_logp_max_diff"] < 1e-5


def test_a_group_sampled_as_one_row_until_its_branch_gives_the_row_by_row_samples(tiny_model):
    """float64, so what is compared is the maths (fp32 would differ in the last bits: other batch compositions)."""
    cfg = TrainConfig(model=str(tiny_model), prompts_per_iter=3, group_size=4, micro_batch=4, num_steps=5,
                      sde_steps=3, antithetic=True)
    policy = FlowPolicy.from_pretrained(tiny_model, micro_batch=4, dtype=torch.float64)
    plan = make_plan(PROMPTS, 4, iteration=3)
    g2rpo = strategy_of(cfg, policy)
    assert len(set(g2rpo.branch_steps(plan).tolist())) > 1  # groups branch at different steps
    branched = g2rpo.rollout(plan)
    row_by_row = FlowStrategy.rollout(g2rpo, plan)  # the same strategy, every row on its own
    assert branched.branch_calls is not None and not hasattr(row_by_row, "branch_calls")
    assert torch.allclose(branched.latents, row_by_row.latents, atol=1e-10, rtol=0)
    assert torch.allclose(branched.log_probs, row_by_row.log_probs, atol=1e-10, rtol=0)
    assert torch.equal(branched.sde_mask, row_by_row.sde_mask)
    assert torch.equal(branched.train_steps, row_by_row.train_steps)


def test_g2rpo_forward_passes_follow_the_shared_prefix_formula(tiny_model, tmp_path):
    """Per iteration, counted on the transformer: the rollout evaluates each group as one row up to and including its
    branch step k (the branch velocities as separate conditional and unconditional calls of at most micro_batch
    groups, as the update repeats them) and its G members after it (both CFG branches in one call); the update makes
    one conditional and one unconditional call per branch call, and as many with the KL reference."""
    cfg = _cfg(tiny_model, tmp_path, strategy="g2rpo", prompts_per_iter=6, group_size=4, micro_batch=4, num_steps=6,
               sde_steps=3, beta=0.1)
    trainer = flow_trainer(cfg)
    policy = trainer.task.policy
    rows_seen = []
    hooks = [m.register_forward_pre_hook(lambda mod, args, kw: rows_seen.append(kw["hidden_states"].shape[0]),
                                         with_kwargs=True)
             for m in (policy.transformer, policy._reference)]
    prompts = PROMPTS * 2
    branch = trainer.task.branch_steps(trainer.plan(prompts)).tolist()
    trainer.step(prompts)
    for h in hooks:
        h.remove()
    g, mb, t_total = cfg.group_size, cfg.micro_batch, cfg.num_steps
    expected = []  # row counts of the calls, in order
    for t in range(t_total):
        shared = sum(k > t for k in branch) + g * sum(k < t for k in branch)  # prefix rows + members after branching
        expected += [2 * min(mb, shared - s) for s in range(0, shared, mb)]  # both CFG halves in one call
        branching = sum(k == t for k in branch)
        for s in range(0, branching, mb):
            expected += [min(mb, branching - s)] * 2  # conditional, unconditional
    branch_calls = [min(mb, sum(k == t for k in branch) - s) for t in range(t_total)
                    for s in range(0, sum(k == t for k in branch), mb)]
    update = [n for n in branch_calls for _ in range(4)]  # policy cond + uncond, reference cond + uncond
    assert rows_seen == expected + update
    rows_per_group = {k: k + 1 + g * (t_total - k - 1) for k in set(branch)}
    assert sum(expected) == 2 * sum(rows_per_group[k] for k in branch)  # vs 2 * g * t_total per group row by row
    assert sum(update) == 4 * len(branch)  # one row per group, instead of g
    assert math.isclose(sum(expected) / (2 * g * t_total * len(branch)), sum(rows_per_group[k] for k in branch) /
                        (g * t_total * len(branch)))
