"""The trainer's PPO update (`flowgrpo.update.ppo_update`) computes TRL's GRPO loss, computed by TRL itself.

TRL (dev-only dependency) is called directly: ``GRPOTrainer._compute_loss(model, inputs)`` on a
trainer built around a second copy of the same tiny Qwen2, with inputs taken from our rollout
(left-padded prompts, completions of different lengths), perturbed old/reference log-probs so
that clipping and the KL term are active, and random advantages (TRL's ratio-weighted KL
correction is switched off: its default multiplies k3 by the importance ratio, which is 1 on the
first inner step anyway). Loss values and gradients must agree for each TRL loss type and the equivalent
flowgrpo aggregation.
"""

import tempfile

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast
from trl import GRPOConfig as TRLConfig
from trl import GRPOTrainer

from flowgrpo.policies.chunks import UpdateBatch
from flowgrpo.policies.llm import LLMPolicy, SamplingConfig
from tests.tiny_llm import build_tiny_causal_lm
from flowgrpo.settings import GRPOSettings
from flowgrpo.update import ppo_update
from tests.helpers import single

# TRL loss_type -> flowgrpo loss_agg (one micro-batch, one process)
EQUIVALENT = {
    "grpo": "seq-mean-token-mean",
    "bnpo": "token-mean",
    "dapo": "token-mean",
    "dr_grpo": "seq-mean-token-sum-norm",
}
G, B, MAX_NEW, TEMP, EPS_LOW, EPS_HIGH = 4, 8, 10, 0.7, 0.2, 0.28


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    path = build_tiny_causal_lm(tmp_path_factory.mktemp("tiny"), seed=4)
    tok = PreTrainedTokenizerFast.from_pretrained(path)
    ours = AutoModelForCausalLM.from_pretrained(path).eval()
    policy = LLMPolicy(ours, tok, SamplingConfig(max_new_tokens=MAX_NEW, temperature=TEMP, stop=tuple("aeiou")))
    prompts = [p for p in ("What is 3+4?", "hi") for _ in range(G)]  # B = 2 groups of G
    rollout = policy.rollout(prompts, torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(2)
    m = rollout.completion_mask
    with torch.no_grad():
        logp = policy.log_prob(rollout)
    old = torch.where(m, logp + 0.3 * torch.randn(logp.shape, generator=g), 0.0)
    ref = torch.where(m, logp + 0.5 * torch.randn(logp.shape, generator=g), 0.0)
    adv = torch.randn(B, generator=g)
    return path, tok, policy, rollout, old, ref, adv


class GradientRecorder(torch.optim.AdamW):
    """AdamW (lr 0: nothing moves) that keeps the gradients it was asked to apply."""

    def step(self, closure=None):
        self.seen = {id(p): p.grad.clone() for g in self.param_groups for p in g["params"]}
        return super().step(closure)


class FixedReference:
    """The policy, with given reference log-probs (perturbed, so the KL term is active)."""

    def __init__(self, policy, ref):
        self.policy, self.ref = policy, ref

    def __getattr__(self, name):
        return getattr(self.policy, name)

    def reference_out(self, rollout, chunk):
        return self.ref[chunk.rows, chunk.cols]


def _trl_trainer(path, tok, loss_type, beta):
    model = AutoModelForCausalLM.from_pretrained(path)
    args = TRLConfig(
        output_dir=tempfile.mkdtemp(), per_device_train_batch_size=B, num_generations=G,
        max_completion_length=MAX_NEW, temperature=TEMP, beta=beta, loss_type=loss_type,
        epsilon=EPS_LOW, epsilon_high=EPS_HIGH, report_to="none", use_cpu=True, bf16=False,
        gradient_checkpointing=False,
        use_bias_correction_kl=False,  # TRL 1.16 default multiplies the k3 term by the ratio; ours is plain k3
    )
    trainer = GRPOTrainer(model=model, reward_funcs=lambda prompts, completions, **_: [0.0] * len(prompts),
                          args=args, train_dataset=Dataset.from_list([{"prompt": "a"}] * B), processing_class=tok)
    trainer.model.eval()  # eval mode: TRL does not divide by gradient-accumulation steps
    return trainer


@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("loss_type", sorted(EQUIVALENT))
def test_loss_and_gradient_equal_trl(setup, loss_type, beta):
    path, tok, policy, r, old, ref, adv = setup
    m = r.completion_mask
    assert int(m.sum(1).min()) < int(m.sum(1).max())  # varied lengths make the aggregations differ
    assert bool((r.prompt_mask.sum(1) < r.prompt_mask.shape[1]).any())  # some prompts are left-padded

    cfg = GRPOSettings(prompts_per_iter=B // G, group_size=G, micro_batch=0, loss_agg=EQUIVALENT[loss_type],
                       clip_low=EPS_LOW, clip_high=EPS_HIGH, beta=beta, grad_clip=0, lr=1e-3)
    optimizer = GradientRecorder(policy.model.parameters(), lr=0.0)
    batch = UpdateBatch(r, m, adv, torch.ones(B, dtype=torch.bool), old, max_len=MAX_NEW)
    stats = ppo_update(FixedReference(policy, ref), optimizer, policy.model, batch, cfg, cfg.layout(1), single())
    assert 0 < stats["clip_frac"] < 1  # both branches of the clip are exercised

    trainer = _trl_trainer(path, tok, loss_type, beta)
    inputs = {
        "prompt_ids": r.prompt_ids, "prompt_mask": r.prompt_mask.long(),
        "completion_ids": r.completion_ids, "completion_mask": m.long(),
        "advantages": adv, "old_per_token_logps": old, "num_items_in_batch": m.sum(),
    }
    if beta:
        inputs["ref_per_token_logps"] = ref
    theirs = trainer._compute_loss(trainer.model, inputs)
    theirs.backward()

    assert stats["loss"] == pytest.approx(float(theirs.detach()), rel=1e-5, abs=1e-6)
    trl_params = dict(trainer.model.named_parameters())
    for name, p in policy.model.named_parameters():
        grad = optimizer.seen[id(p)]
        scale = float(grad.abs().max()) + 1e-8
        assert (grad - trl_params[name].grad).abs().max() <= 1e-4 * scale, name
