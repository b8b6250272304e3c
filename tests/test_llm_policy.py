"""LLM policy adapter on tiny random Qwen2/Llama models: prompts, sampling, masks, log-probs, reference."""

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from flowgrpo.checkpoint import CheckpointError
from flowgrpo.policies.llm import (LLMPolicy, SamplingConfig, TokenRollout, _inverse_cdf, _plain_copy, _top_p_filter,
                                  load_causal_lm)
from tests.tiny_llm import build_tiny_causal_lm


@pytest.fixture(scope="module", params=["qwen2", "llama"])
def tiny(request, tmp_path_factory):
    path = build_tiny_causal_lm(tmp_path_factory.mktemp(request.param), arch=request.param, seed=1)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    return model, PreTrainedTokenizerFast.from_pretrained(path)


def _greedy(model, ids, n):
    """Greedy continuation by full forward passes on the unpadded sequence (no cache)."""
    ids = list(ids)
    out = []
    with torch.no_grad():
        for _ in range(n):
            logits = model(input_ids=torch.tensor([ids + out])).logits[0, -1]
            out.append(int(logits.argmax()))
    return out


def test_prompts_are_left_padded_and_masked(tiny):
    model, tok = tiny
    policy = LLMPolicy(model, tok)
    ids, mask = policy.encode_prompts(["abc", "a", [{"role": "user", "content": "x"}]])
    (a, b, c), pad = [tok.convert_tokens_to_ids(ch) for ch in "abc"], tok.pad_token_id
    chat = tok("user: x\nassistant: ")["input_ids"]
    assert ids.shape == (3, len(chat))
    w = len(chat)
    assert ids[0].tolist() == [pad] * (w - 3) + [a, b, c]
    assert ids[1].tolist() == [pad] * (w - 1) + [a]
    assert ids[2].tolist() == chat
    assert mask.sum(1).tolist() == [3, 1, w]
    assert mask[0].tolist() == [False] * (w - 3) + [True] * 3


def test_completion_mask_ends_at_eos_and_excludes_padding(tiny):
    model, tok = tiny
    prompts = ["What is 1+2?", "hi"]
    expected = [_greedy(model, tok(p)["input_ids"], 10) for p in prompts]
    eos = expected[0][3]  # make the 4th greedy token of prompt 0 the EOS
    assert eos not in expected[0][:3]
    model.generation_config.eos_token_id = eos
    policy = LLMPolicy(model, tok, SamplingConfig(max_new_tokens=10, top_p=1e-9))  # top_p -> greedy
    r = policy.rollout(prompts, torch.Generator().manual_seed(0))
    model.generation_config.eos_token_id = tok.eos_token_id
    # prompt 1 (left-padded by 10 tokens) runs to max_new_tokens unless it meets the EOS too
    n1 = expected[1].index(eos) + 1 if eos in expected[1] else 10
    width = max(4, n1)  # the batch is as long as its longest completion
    assert r.completion_ids[1, :n1].tolist() == expected[1][:n1]
    assert r.completion_mask[1].tolist() == [True] * n1 + [False] * (width - n1)
    # prompt 0 stops at (and includes) the EOS; the rest of the row is padding outside the mask
    assert r.completion_ids[0, :4].tolist() == expected[0][:4]
    assert r.completion_mask[0].tolist() == [True] * 4 + [False] * (width - 4)
    assert r.completion_ids[0, 4:].tolist() == [tok.pad_token_id] * (width - 4)
    assert bool(r.stopped[0]) and bool(r.stopped[1]) == (n1 < 10)
    assert (r.sample_logp[0, 4:] == 0).all()
    assert r.completions[0] == tok.decode(expected[0][:4])  # this EOS is an ordinary character


def test_stop_string_ends_completion_and_text_keeps_it(tiny):
    model, tok = tiny
    prompt = "abc"
    greedy = _greedy(model, tok(prompt)["input_ids"], 8)
    text = tok.decode(greedy)
    assert len(text) == 8  # one character per token
    # a two-character stop string whose first occurrence ends at token `end` (>= 3)
    end = next(e for e in range(3, 9) if text[e - 2:e] not in text[:e - 1])
    stop = text[end - 2:end]
    policy = LLMPolicy(model, tok, SamplingConfig(max_new_tokens=8, top_p=1e-9, stop=(stop, "never-seen")))
    r = policy.rollout([prompt], torch.Generator().manual_seed(0))
    assert r.completion_mask[0].tolist() == [True] * end  # the batch ends when every row has stopped
    assert r.completions == [text[:end]]
    assert bool(r.stopped[0])


def test_sampler_and_recomputed_logprobs_agree_ratio_one(tiny):
    """fp32, left padding, temperature and top-p: exp(logp_train - logp_sample) = 1 within 1e-5."""
    model, tok = tiny
    policy = LLMPolicy(model, tok, SamplingConfig(max_new_tokens=16, temperature=0.7, top_p=0.9, stop=("q",)))
    prompts = ["What is 17+25?", "a", [{"role": "user", "content": "hello there"}], "xyz"] * 2
    r = policy.rollout(prompts, torch.Generator().manual_seed(3))
    logp = policy.log_prob(r)
    m = r.completion_mask
    assert m.sum() > 40 and not m.all()  # some rows stopped early
    ratio = torch.exp(logp - r.sample_logp)[m]
    assert (ratio - 1).abs().max() < 1e-5
    assert (logp[~m] == 0).all() and logp.requires_grad


def test_logprob_matches_unpadded_model_at_temperature(tiny):
    """Hand-built rollout: padded prompts + padded completions give the same token log-probs as the
    model run on each bare sequence, with logits divided by the temperature."""
    model, tok = tiny
    temp = 0.5
    policy = LLMPolicy(model, tok, SamplingConfig(temperature=temp))
    enc = [tok(s)["input_ids"] for s in ("12+3=", "7=")]
    comp = [tok(s)["input_ids"] for s in ("15", "7!x")]
    pad = tok.pad_token_id
    prompt_ids = torch.tensor([enc[0], [pad] * 3 + enc[1]])
    prompt_mask = prompt_ids != pad
    completion_ids = torch.tensor([comp[0] + [pad], comp[1]])
    completion_mask = torch.tensor([[True, True, False], [True, True, True]])
    r = TokenRollout(prompt_ids, prompt_mask, completion_ids, completion_mask, torch.zeros(2, 3), ["", ""],
                     torch.ones(2, dtype=torch.bool))
    logp = policy.log_prob(r)
    for i in range(2):
        seq = torch.tensor([enc[i] + comp[i]])
        with torch.no_grad():
            logits = model(input_ids=seq).logits[0] / temp
        lp = torch.log_softmax(logits, -1)
        p = len(enc[i])
        want = [float(lp[p - 1 + t, comp[i][t]]) for t in range(len(comp[i]))]
        assert logp[i, : len(want)].tolist() == pytest.approx(want, abs=1e-5)
    assert logp[0, 2] == 0


def test_shared_prompt_prefill_equals_rows_run_alone(tiny):
    """Repeated prompts share one prefill; log-probs and gradients equal those of each row alone."""
    model, tok = tiny
    policy = LLMPolicy(model, tok, SamplingConfig(max_new_tokens=8, temperature=0.9, stop=("e",)))
    r = policy.rollout(["abc"] * 3 + ["What is 2+2?"] * 3, torch.Generator().manual_seed(4))
    model.zero_grad()
    shared = policy.log_prob(r)
    (shared * torch.arange(1.0, 7.0)[:, None]).sum().backward()
    g_shared = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    alone = []
    for i in range(6):
        lp = policy.log_prob(r.select(slice(i, i + 1)))
        (lp * (i + 1)).sum().backward()
        alone.append(lp.detach())
    assert torch.allclose(shared.detach(), torch.cat(alone), atol=1e-5)
    for n, p in model.named_parameters():
        assert torch.allclose(g_shared[n], p.grad, atol=1e-5, rtol=1e-4), n


def test_top_p_filter_hand_computed():
    probs = torch.tensor([[0.1, 0.5, 0.15, 0.25]])
    # sorted: 0.5, 0.25, 0.15, 0.1; top_p 0.7 keeps 0.5 and 0.25 (mass 0.75 >= 0.7)
    cases = {0.7: [0.0, 0.5, 0.0, 0.25], 0.75: [0.0, 0.5, 0.0, 0.25], 0.76: [0.0, 0.5, 0.15, 0.25],
             1e-9: [0.0, 0.5, 0.0, 0.0], 1.0: [0.1, 0.5, 0.15, 0.25]}
    for top_p, want in cases.items():
        assert torch.equal(_top_p_filter(probs, top_p), torch.tensor([want])), top_p


def test_sampling_is_reproducible_from_the_generator(tiny):
    model, tok = tiny
    policy = LLMPolicy(model, tok, SamplingConfig(max_new_tokens=6))
    a = policy.rollout(["ab", "c"], torch.Generator().manual_seed(5))
    b = policy.rollout(["ab", "c"], torch.Generator().manual_seed(5))
    c = policy.rollout(["ab", "c"], torch.Generator().manual_seed(6))
    assert torch.equal(a.completion_ids, b.completion_ids)
    assert not torch.equal(a.completion_ids, c.completion_ids)


def test_keyed_rows_sample_the_same_completion_in_any_batch(tiny):
    """A row's tokens come from its own keyed uniforms: sampled with other rows (other padding, other batch
    size) or in two halves, it completes the same way. That is what makes a run independent of its process count."""
    model, tok = tiny
    policy = LLMPolicy(model, tok, SamplingConfig(max_new_tokens=6))
    prompts, keys = ["ab", "c", "xyzw", "ab"], [(3, 5, 0, i) for i in range(4)]
    whole = policy.rollout(prompts, keys=keys)
    halves = [policy.rollout(prompts[:2], keys=keys[:2]), policy.rollout(prompts[2:], keys=keys[2:])]
    assert whole.completions == halves[0].completions + halves[1].completions
    assert whole.completions[0] != whole.completions[3]  # the same prompt under another key
    with pytest.raises(ValueError, match="exactly one of generator= or keys="):
        policy.rollout(prompts, torch.Generator(), keys=keys)


def test_inverse_cdf_sampling_hand_computed():
    probs = torch.tensor([[0.1, 0.0, 0.6, 0.3]] * 6)  # cdf 0.1, 0.1, 0.7, 1.0: a zero-mass token is never drawn
    u = torch.tensor([0.0, 0.05, 0.1, 0.69, 0.71, 0.999])
    assert _inverse_cdf(probs, u).tolist() == [0, 0, 2, 2, 3, 3]


def test_lora_reference_is_the_base_model(tiny, tmp_path):
    model, tok = tiny
    base = AutoModelForCausalLM.from_pretrained(model.name_or_path).eval()
    lora = get_peft_model(AutoModelForCausalLM.from_pretrained(model.name_or_path).eval(),
                          LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    policy = LLMPolicy(lora, tok, SamplingConfig(max_new_tokens=5))
    assert policy.is_peft
    r = policy.rollout(["ab", "xyz"], torch.Generator().manual_seed(0))
    ref = policy.ref_log_prob(r)
    want = LLMPolicy(base, tok, SamplingConfig(max_new_tokens=5)).log_prob(r)
    assert torch.allclose(ref, want, atol=1e-6)
    assert not torch.allclose(policy.log_prob(r), want, atol=1e-3)  # the adapter is active outside
    # trainable parameters round-trip by name (what checkpoints hold)
    names = {n for n, p in lora.named_parameters() if p.requires_grad}
    assert names and all("lora_" in n for n in names)
    before = policy.trainable_state_dict()
    assert set(before) == names
    with torch.no_grad():
        for p in policy.trainable_parameters():
            p.add_(1.0)
    policy.load_trainable_state_dict(before)
    after = policy.trainable_state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    with pytest.raises(CheckpointError, match="does not match the model's trainable parameters"):
        policy.load_trainable_state_dict({k: v for k, v in list(before.items())[1:]})


def test_no_reference_is_a_clear_error(tiny):
    model, tok = tiny
    policy = LLMPolicy(model, tok, SamplingConfig(max_new_tokens=2))
    r = policy.rollout(["a"], torch.Generator().manual_seed(0))
    with pytest.raises(RuntimeError, match="no reference policy"):
        policy.ref_log_prob(r)


@pytest.mark.parametrize(("kwargs", "msg"), [
    ({"temperature": 0.0}, "temperature must be > 0"),
    ({"top_p": 0.0}, "top_p"),
    ({"max_new_tokens": 0}, "max_new_tokens"),
    ({"stop": ("",)}, "stop must be"),
])
def test_bad_sampling_config(kwargs, msg):
    with pytest.raises(ValueError, match=msg):
        SamplingConfig(**kwargs)


def test_bad_prompts(tiny):
    model, tok = tiny
    policy = LLMPolicy(model, tok)
    with pytest.raises(ValueError, match="no prompts"):
        policy.encode_prompts([])
    with pytest.raises(TypeError, match="str or a list of chat messages"):
        policy.encode_prompts([42])


def test_load_causal_lm_from_a_local_dir_with_lora(tmp_path):
    path = build_tiny_causal_lm(tmp_path / "m", arch="llama", seed=5)
    model, tok = load_causal_lm(path, lora_rank=2)
    assert tok("ab")["input_ids"] == [tok.convert_tokens_to_ids("a"), tok.convert_tokens_to_ids("b")]
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert LLMPolicy(model, tok).is_peft
    with pytest.raises(FileNotFoundError, match="local paths only"):
        load_causal_lm(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="GGUF file"):
        load_causal_lm(path, gguf_file="model.gguf")


def test_plain_copy_keeps_weights_and_generation_config(tiny, tmp_path):
    model, _ = tiny
    plain = _plain_copy(model, torch.float32)
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        assert torch.equal(plain(input_ids=ids).logits, model(input_ids=ids).logits)
    assert plain.generation_config.eos_token_id == model.generation_config.eos_token_id
    plain.save_pretrained(tmp_path / "saved")  # a plain model is serialisable
