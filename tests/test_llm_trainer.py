"""flowgrpo.llm.GRPO on tiny random Qwen2 models: config checks, exact ratios, gradient-accumulation
invariance, reference never run at beta = 0, unscorable rewards, all estimators, resume, learning."""

import math

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from flowgrpo.core import ADVANTAGES
from flowgrpo.llm import GRPO, GRPOConfig
from flowgrpo.policies.llm import LLMPolicy
from tests.tiny_llm import build_tiny_causal_lm
from flowgrpo.samplers.noise import Stream

PROMPTS = [{"prompt": p, "answer": str(i)} for i, p in enumerate(["ab", "xyz", "hello", "q", "12+3", "zz", "k", "mn"])]
STOPS = tuple("aeiou,.;:!")  # frequent stops -> completions of different lengths


@pytest.fixture(scope="module")
def path(tmp_path_factory):
    return build_tiny_causal_lm(tmp_path_factory.mktemp("tiny"), seed=2)


def _load(path):
    return AutoModelForCausalLM.from_pretrained(path), PreTrainedTokenizerFast.from_pretrained(path)


def distinct(prompts, completions, **_):
    """Reward in [0, 1] with plenty of spread on a random model."""
    return [len(set(c)) / 8 for c in completions]


def vowels(prompts, completions, **_):
    return [sum(ch in "aeiou" for ch in c) / 8 for c in completions]


def _trainer(path, reward_fns=distinct, **kw):
    model, tok = _load(path)
    cfg = dict(group_size=4, prompts_per_iter=2, max_new_tokens=8, lr=1e-2, stop=STOPS)
    cfg.update(kw)
    return GRPO(model, tok, reward_fns, **cfg)


def _record_grads(trainer) -> dict:
    """The gradients the optimizer is asked to apply (the update frees them after its step), by parameter name."""
    seen, inner = {}, trainer.trainer.optimizer.optimizer
    names = {id(p): n for n, p in trainer.policy.model.named_parameters()}
    step = inner.step

    def recording_step(*args, **kwargs):
        seen.update({names[id(p)]: p.grad.clone() for g in inner.param_groups for p in g["params"] if p.grad is not None})
        return step(*args, **kwargs)

    inner.step = recording_step
    return seen


# ---- configuration --------------------------------------------------------------------------------
@pytest.mark.parametrize(("kwargs", "msg"), [
    ({"micro_batch_size": 3}, r"samples per iteration = prompts_per_iter x group_size = 2 x 4 = 8: each of 1 "
                              r"process\(es\) holds 8 samples per optimizer step \(optimizer_steps=1\), not a multiple "
                              r"of micro_batch=3"),
    ({"advantage": "nope"}, "unknown advantage"),
    ({"num_generations": 1}, "group_size must be >= 2"),
    ({"advantage": "stratified"}, "alpha"),
    ({"loss_agg": "mean"}, "unknown loss_agg"),
    ({"save_every": 5}, "needs an out directory"),
    ({"temperature": 0.0}, "temperature"),
    ({"advantage_opts": {"tracker": None}}, "supplied by the trainer"),
])
def test_config_errors_name_the_numbers(kwargs, msg):
    """TRL's names are accepted (num_generations = group_size, micro_batch_size = micro_batch, ...)."""
    with pytest.raises(ValueError, match=msg):
        GRPOConfig.from_kwargs(**{"num_generations": 4, "prompts_per_step": 2, **kwargs})


def test_config_derived_sizes_and_trl_names():
    cfg = GRPOConfig(group_size=6, prompts_per_iter=4, micro_batch=8)
    assert cfg == GRPOConfig.from_kwargs(num_generations=6, prompts_per_step=4, micro_batch_size=8)
    assert (cfg.batch_size, cfg.layout(1).micro_batches_per_step, cfg.layout(3).micro_batches_per_step) == (24, 3, 1)
    assert GRPOConfig(group_size=1, advantage="spo").batch_size == 4  # SPO needs no group
    trl = GRPOConfig.from_kwargs(learning_rate=1e-5, eps_low=0.1, epsilon_high=0.3, num_iterations=2,
                                 max_grad_norm=None, output_dir=None, advantage_opts={"scale": "none"})
    assert (trl.lr, trl.clip_low, trl.clip_high, trl.inner_epochs, trl.grad_clip, trl.out) == (1e-5, 0.1, 0.3, 2, 0, "")
    assert trl.advantage_options == {"scale": "none"}


def test_trainer_argument_errors(path):
    model, tok = _load(path)
    with pytest.raises(TypeError, match="unknown GRPO setting 'num_generation'"):
        GRPO(model, tok, distinct, num_generation=4)
    with pytest.raises(ValueError, match="reward_weights has 1 entries for 2 reward functions"):
        GRPO(model, tok, [distinct, vowels], reward_weights=[1.0])
    with pytest.raises(ValueError, match="reward_fns"):
        GRPO(model, tok, [])
    tr = _trainer(path)
    with pytest.raises(ValueError, match="an iteration takes prompts_per_iter=2 prompts, got 3"):
        tr.iterate(PROMPTS[:3])
    bad = _trainer(path, reward_fns=lambda prompts, completions, **_: [1.0])
    with pytest.raises(ValueError, match="returned 1 values for 8 completions"):
        bad.iterate(PROMPTS[:2])
    bad = _trainer(path, reward_fns=lambda prompts, completions, **_: ["good"] * len(prompts))
    with pytest.raises(TypeError, match="expected float or None"):
        bad.iterate(PROMPTS[:2])


# ---- exactness ----------------------------------------------------------------------------------
def test_first_inner_step_has_ratio_one_and_later_steps_move(path):
    one = _trainer(path, inner_epochs=1).iterate(PROMPTS[:2])
    assert one["ratio_min"] == 1.0 and one["ratio_max"] == 1.0
    # the sampler's own log-probs (KV cache, left padding) agree with the training forward: |r - 1| < 1e-5
    assert math.expm1(one["sampler_logp_max_diff"]) < 1e-5
    three = _trainer(path, inner_epochs=3).iterate(PROMPTS[:2])
    assert max(three["ratio_max"] - 1, 1 - three["ratio_min"]) > 1e-3  # later inner epochs are off-policy
    assert three["loss"] == pytest.approx(one["loss"], abs=1e-7)  # the first inner step is the same


@pytest.mark.parametrize("loss_agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum",
                                      "seq-mean-token-sum-norm"])
@pytest.mark.parametrize("beta", [0.0, 0.05])
def test_gradient_is_independent_of_micro_batching(path, loss_agg, beta):
    """1 vs 4 micro-batches give the same loss and gradient up to fp32 rounding: max |diff| <= 1e-5 x the
    largest gradient entry (observed ~1e-6, while normalising per micro-batch instead is off by
    > 1e-2). Row 0 is unscorable, so micro-batches hold different numbers of valid sequences."""
    def reward(prompts, completions, **_):
        return [None] + distinct(prompts, completions[1:])

    kw = dict(loss_agg=loss_agg, beta=beta, advantage_options={"scale": "none"}, grad_clip=0, reward_fns=reward)
    whole = _trainer(path, **kw)
    split = _trainer(path, micro_batch=2, **kw)  # 4 micro-batches
    g1, g4 = _record_grads(whole), _record_grads(split)
    m1, m4 = whole.iterate(PROMPTS[:2]), split.iterate(PROMPTS[:2])
    assert m1["loss"] == pytest.approx(m4["loss"], rel=1e-6, abs=1e-7)
    assert 1 < m1["completion_len"] < 8  # completions of different lengths make the normaliser matter
    scale = max(float(g.abs().max()) for g in g1.values())
    assert scale > 1e-4
    worst = max(float((g1[n] - g4[n]).abs().max()) for n in g1)
    assert worst <= 1e-5 * scale


# ---- reference --------------------------------------------------------------------------------
def _count_calls(module, predicate=lambda: True):
    calls = []
    module.register_forward_pre_hook(lambda *_: calls.append(1) if predicate() else None)
    return calls


@pytest.mark.parametrize("beta", [0.0, 0.1])
def test_frozen_reference_runs_only_when_beta_positive(path, beta):
    ref, _ = _load(path)
    calls = _count_calls(ref)
    tr = GRPO(*_load(path), distinct, ref_model=ref, beta=beta, group_size=4, prompts_per_iter=2,
              micro_batch=4, max_new_tokens=6)
    m = tr.iterate(PROMPTS[:2])
    tr.iterate(PROMPTS[2:4])
    # per step: two micro-batches, each one prompt forward + one completion forward
    assert len(calls) == (0 if beta == 0 else 2 * 2 * 2)
    assert ("kl" in m) == (beta > 0)


@pytest.mark.parametrize("beta", [0.0, 0.1])
def test_lora_reference_runs_only_when_beta_positive(path, beta):
    model, tok = _load(path)
    lora = get_peft_model(model, LoraConfig(r=2, target_modules="all-linear"))
    layers = [m for m in lora.modules() if isinstance(m, BaseTunerLayer)]
    calls = _count_calls(lora.get_base_model(), lambda: all(m.disable_adapters for m in layers))
    tr = GRPO(lora, tok, distinct, beta=beta, group_size=4, prompts_per_iter=2, max_new_tokens=6, lr=1e-2)
    m = tr.iterate(PROMPTS[:2])
    assert len(calls) == (0 if beta == 0 else 2)  # prompt forward + completion forward
    if beta:
        assert m["kl"] == 0.0  # LoRA B starts at zero: policy = reference on the first step
    assert all("lora_" in n for n, p in lora.named_parameters() if p.requires_grad)


# ---- rewards -------------------------------------------------------------------------------------
def test_none_reward_gets_zero_weight_hand_computed_gradient(path):
    """Row 0 unscorable: the gradient equals the hand-built GRPO gradient of the other rows."""
    def reward(prompts, completions, **_):
        return [None] + [len(set(c)) / 8 for c in completions[1:]]

    tr = _trainer(path, reward_fns=reward, group_size=3, grad_clip=0)
    got = _record_grads(tr)
    # replay the same rollout from the same keys (seed 0, iteration 0, sample i) to build the expectation independently
    probe, _ = _load(path)
    policy = LLMPolicy(probe, tr.policy.tokenizer, tr.config.sampling)
    rollout = policy.rollout([r["prompt"] for r in PROMPTS[:2] for _ in range(3)],
                             keys=[(0, Stream.TOKENS, 0, i) for i in range(6)])
    m = tr.iterate(PROMPTS[:2])
    assert m["adv/n_nan"] == 1.0 and m["adv/n_valid"] == 5.0
    r = torch.tensor([math.nan] + [len(set(c)) / 8 for c in rollout.completions[1:]], dtype=torch.float64)
    adv = torch.zeros(6, dtype=torch.float64)
    for rows in ([1, 2], [3, 4, 5]):  # group stats over the scored rows only (population std)
        g = r[rows]
        adv[rows] = (g - g.mean()) / (g.std(correction=0) + 1e-4)
    logp = policy.log_prob(rollout)
    mask = rollout.completion_mask.float()
    # seq-mean-token-mean over the 5 valid rows; at ratio 1 the loss gradient is -A * grad(logp)
    per_row = (logp * mask).sum(1) / mask.sum(1)
    loss = -(adv[1:].float() * per_row[1:]).sum() / 5
    loss.backward()
    for name, p in probe.named_parameters():
        assert torch.allclose(got[name], p.grad, atol=1e-6, rtol=1e-4), name


def test_reward_functions_get_columns_and_multi_reward_matrix(path):
    seen = {}

    def spy(prompts, completions, completion_ids, answer, **_):
        seen.update(prompts=prompts, answer=answer, ids=completion_ids, completions=completions)
        return [1.0] * len(prompts)

    tr = _trainer(path, reward_fns=[spy, vowels], reward_weights=[0.5, 2.0], advantage="gdpo")
    m = tr.iterate(PROMPTS[:2])
    assert m["adv/n_valid"] == 8.0
    assert seen["prompts"] == ["ab"] * 4 + ["xyz"] * 4
    assert seen["answer"] == ["0"] * 4 + ["1"] * 4
    tok = tr.policy.tokenizer
    assert [tok.decode(i, skip_special_tokens=True) for i in seen["ids"]] == seen["completions"]
    assert m["reward_mean"] == pytest.approx(0.5 + 2.0 * m["reward/vowels"])
    assert m["reward/spy"] == 1.0


def test_chat_prompts_give_chat_completions(path):
    seen = {}

    def spy(prompts, completions, **_):
        seen["c"] = completions
        return [0.0] * len(prompts)

    tr = _trainer(path, reward_fns=spy)
    tr.iterate([{"prompt": [{"role": "user", "content": "hi"}]}] * 2)
    assert all(c[0]["role"] == "assistant" and isinstance(c[0]["content"], str) for c in seen["c"])


@pytest.mark.parametrize("name", sorted(ADVANTAGES))
def test_every_core_estimator_runs_by_name(path, name):
    opts = {"alpha": 0.5} if name == "stratified" else {}
    rows = [dict(r, strata=i % 2) for i, r in enumerate(PROMPTS)]
    tr = _trainer(path, advantage=name, advantage_options=opts, group_size=5)
    m = tr.iterate(rows[:2])
    assert m["adv/n_valid"] == (8.0 if name == "mc_grpo" else 10.0)  # MC-GRPO drops one pivot per group
    assert math.isfinite(m["loss"]) and math.isfinite(m["grad_norm"])
    if name in ("spo", "bnpo"):
        assert len(tr.tracker) == 2  # one tracked entry per prompt


def test_stratified_needs_a_strata_column(path):
    tr = _trainer(path, advantage="stratified", advantage_options={"alpha": 0.5})
    with pytest.raises(ValueError, match="'strata' column"):
        tr.iterate(PROMPTS[:2])


# ---- training loop, resume, learning -------------------------------------------------------------
@pytest.mark.parametrize("advantage", ["grpo", "spo"])
def test_resume_gives_the_identical_next_steps(path, tmp_path, advantage):
    data = PROMPTS[:6]  # 3 batches per epoch: the run crosses an epoch boundary
    a = _trainer(path, advantage=advantage, inner_epochs=2, micro_batch=4)
    a.train(data, iterations=2, progress=False)
    a.save_checkpoint(tmp_path / "ck")
    after_a = a.train(data, iterations=5, progress=False)
    b = _trainer(path, advantage=advantage, inner_epochs=2, micro_batch=4)
    b.load_checkpoint(tmp_path / "ck")
    after_b = b.train(data, iterations=5, progress=False)
    strip = lambda ms: [{k: v for k, v in m.items() if not k.startswith(("time_", "seconds", "train_min"))}  # noqa: E731
                        for m in ms]
    assert strip(after_a) == strip(after_b)
    sa, sb = a.policy.trainable_state_dict(), b.policy.trainable_state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert b.iteration == 5 and len(b.history) == 5
    with pytest.raises(ValueError, match="prompts_per_iter: checkpoint 2 vs now 4"):
        _trainer(path, prompts_per_iter=4).load_checkpoint(tmp_path / "ck")


def test_train_on_datasets_dataset_raises_reward(path, tmp_path):
    tr = _trainer(path, reward_fns=vowels, group_size=8, stop=(), out=str(tmp_path), save_every=10, lr=3e-2)
    hist = tr.train(Dataset.from_list(PROMPTS), iterations=20, progress=False)
    first, last = sum(h["reward_mean"] for h in hist[:3]) / 3, sum(h["reward_mean"] for h in hist[-3:]) / 3
    assert first < 0.3 and last > 0.8
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["iter-000010", "iter-000020"]
    assert (tmp_path / "checkpoints" / "iter-000020" / "weights.safetensors").is_file()
    again = _trainer(path, reward_fns=vowels, group_size=8, stop=(), out=str(tmp_path), save_every=10, lr=3e-2)
    assert again.train(Dataset.from_list(PROMPTS), iterations=20, progress=False) == []  # resumed at step 20
    assert again.iteration == 20
