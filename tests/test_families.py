"""SD3, FLUX and Sana through the FlowPolicy adapter, each a tiny random pipeline loaded from a local directory.

The ODE rollouts must equal each pipeline's own `__call__` (same noise, same steps), which checks the
family's prompt encoding, timestep convention, latent packing and sigma grid against diffusers itself.
"""
import json

import pytest
import torch
from diffusers import DiffusionPipeline, DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler, FluxPipeline
from safetensors.torch import load_file

from flowgrpo.config import TrainConfig, make_config
from flowgrpo.core import compute_advantages
from flowgrpo.policies.families import (
    SanaFamily,
    dpm_flow_sigmas,
    family_for,
    latent_image_ids,
    pack_latents,
    unpack_latents,
)
from flowgrpo.policies.flow import FlowPolicy, empty_components
from flowgrpo.rewards import Reward, register_reward
from flowgrpo.samplers.rollout import group_noise, sample_trajectory
from flowgrpo.train import train
from tests.helpers import one_update
from tests.tiny_pipelines import IMAGE_SIZE, tiny_flux, tiny_sana, tiny_sd3

PROMPTS = ["a red circle on the left", "two blue dogs"]
# Small text lengths keep the tiny models fast; the pipelines are called with the same values.
OPTIONS = {"sd3": {"max_sequence_length": 1}, "flux": {"max_sequence_length": 16, "guidance_scale": 2.5},
           "sana": {"max_sequence_length": 12}}
BUILDERS = {"sd3": tiny_sd3, "flux": tiny_flux, "sana": tiny_sana}
FAMILY_NAMES = list(BUILDERS)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny-pipelines")
    return {name: build(root) for name, build in BUILDERS.items()}


def _policy(models, name, **kw) -> FlowPolicy:
    return FlowPolicy.from_pretrained(models[name], height=IMAGE_SIZE, width=IMAGE_SIZE,
                                      family_options=OPTIONS[name], **kw)


def _ode(policy, x, num_steps, guidance):
    traj = sample_trajectory(policy.velocity_fn(policy.cond(PROMPTS), guidance), x, policy.sigmas(num_steps),
                             sde_mask=torch.zeros(num_steps, dtype=torch.bool), generator=None)
    return traj.latents[:, -1]


def _pipeline_latents(name, policy, x, num_steps, guidance):
    """The pipeline's own sampling loop from the same initial noise (its output_type="latent" layout)."""
    pipe, common = policy.pipe, dict(height=IMAGE_SIZE, width=IMAGE_SIZE, output_type="latent",
                                     max_sequence_length=OPTIONS[name]["max_sequence_length"])
    negative = "" if guidance > 1 else None
    if name == "sd3":
        return pipe(PROMPTS, latents=x, num_inference_steps=num_steps, guidance_scale=guidance,
                    negative_prompt=negative, **common).images
    if name == "flux":  # latents go in and come out packed; CFG is FLUX's true_cfg_scale
        return pipe(PROMPTS, latents=pack_latents(x), num_inference_steps=num_steps, true_cfg_scale=guidance,
                    negative_prompt=negative, guidance_scale=OPTIONS["flux"]["guidance_scale"], **common).images
    # Sana: its DPM-Solver scheduler casts timesteps to integers; an Euler scheduler (shift 1 = sigmas as given)
    # on the same grid is the same first-order flow ODE with exact timesteps.
    own, sigmas = pipe.scheduler, policy.sigmas(num_steps)[:-1].tolist()
    pipe.scheduler = FlowMatchEulerDiscreteScheduler()
    try:
        return pipe(PROMPTS, latents=x, sigmas=sigmas, guidance_scale=guidance,
                    negative_prompt=negative or "", use_resolution_binning=False, **common).images
    finally:
        pipe.scheduler = own


@pytest.mark.parametrize("name", FAMILY_NAMES)
@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_ode_sampling_matches_the_pipeline(models, name, guidance):
    policy = _policy(models, name)
    x = torch.randn((2, *policy.latent_shape()), generator=torch.Generator().manual_seed(0))
    ours = _ode(policy, x, 3, guidance)
    ref = _pipeline_latents(name, policy, x, 3, guidance)
    if name == "flux":
        ours = pack_latents(ours)
    assert ref.abs().max() > 1.0  # non-trivial outputs
    assert (ours - ref).abs().max() < 1e-4


def test_flux_without_guidance_embedding_matches_the_pipeline(tmp_path):
    path = tiny_flux(tmp_path, guidance_embeds=False)  # FLUX.1-schnell style: no guidance input
    policy = FlowPolicy.from_pretrained(path, height=IMAGE_SIZE, width=IMAGE_SIZE, family_options=OPTIONS["flux"])
    x = torch.randn((2, *policy.latent_shape()), generator=torch.Generator().manual_seed(1))
    ref = _pipeline_latents("flux", policy, x, 2, 1.0)
    assert (pack_latents(_ode(policy, x, 2, 1.0)) - ref).abs().max() < 1e-4


def test_flux_packing_and_ids_match_the_pipeline():
    x = torch.randn(2, 4, 6, 8, generator=torch.Generator().manual_seed(0))
    packed = pack_latents(x)
    assert torch.equal(packed, FluxPipeline._pack_latents(x, 2, 4, 6, 8))
    assert torch.equal(unpack_latents(packed, 6, 8), x)
    assert torch.equal(unpack_latents(packed, 6, 8), FluxPipeline._unpack_latents(packed, 6 * 8, 8 * 8, 8))
    ids = latent_image_ids(6, 8)
    assert torch.equal(ids, FluxPipeline._prepare_latent_image_ids(2, 3, 4, "cpu", torch.float32))
    assert ids[5].tolist() == [0.0, 1.0, 1.0]  # token 5 = patch row 1, column 1 of a 3x4 grid


def test_flux_sigmas_follow_the_pipeline_dynamic_shift(models):
    policy = _policy(models, "flux")
    sched = FlowMatchEulerDiscreteScheduler.from_config(policy.pipe.scheduler.config)
    for size, steps in ((32, 4), (64, 2)):
        seq = (size // 4) ** 2  # VAE factor 2 and 2x2 packing: one token per 4x4 pixels
        mu = 0.5 + (1.15 - 0.5) * (seq - 256) / (4096 - 256)
        sched.set_timesteps(sigmas=[1 - i / steps for i in range(steps)], mu=mu)
        assert torch.equal(policy.family.sigmas(policy.pipe, steps, size, size), sched.sigmas)


@pytest.mark.parametrize("steps", [1, 4, 20])
def test_sana_sigmas_are_the_dpm_solver_flow_grid(steps):
    sched = DPMSolverMultistepScheduler(use_flow_sigmas=True, flow_shift=3.0, prediction_type="flow_prediction")
    sched.set_timesteps(steps)
    assert torch.equal(dpm_flow_sigmas(dict(sched.config), steps), sched.sigmas)
    assert dpm_flow_sigmas({"flow_shift": 1.0}, 2).tolist() == pytest.approx([0.999, 0.4995, 0.0])


def test_default_size_and_bad_sizes_and_pipelines(models):
    native = FlowPolicy.from_pretrained(models["flux"])  # FluxPipeline's default: 128 latent pixels
    assert native.height == native.width == 128 * native.pipe.vae_scale_factor
    assert FlowPolicy.from_pretrained(models["sana"]).height == IMAGE_SIZE  # Sana: transformer sample_size
    flux = _policy(models, "flux")
    with pytest.raises(ValueError, match="multiples of 4"):
        flux.family.latent_shape(flux.pipe, 30, 32)
    sana = _policy(models, "sana")
    with pytest.raises(ValueError, match="multiples of 4"):
        sana.family.latent_shape(sana.pipe, 32, 18)
    with pytest.raises(ValueError, match="unsupported pipeline Module"):
        family_for(torch.nn.Module())


def test_sana_instruction_prefix_is_the_pipeline_default_and_configurable(models):
    policy = _policy(models, "sana")
    pipe = policy.pipe
    with_default = SanaFamily(max_sequence_length=12).encode(pipe, PROMPTS)
    without = SanaFamily(max_sequence_length=12, complex_human_instruction=[]).encode(pipe, PROMPTS)
    embeds, mask, _, _ = pipe.encode_prompt(PROMPTS, do_classifier_free_guidance=False, max_sequence_length=12)
    assert torch.equal(without["embeds"], embeds) and torch.equal(without["mask"], mask)
    assert not torch.allclose(with_default["embeds"], without["embeds"])
    # The unconditional branch never carries the prefix, as in SanaPipeline.
    neg_embeds, _, _, _ = pipe.encode_prompt(["", ""], do_classifier_free_guidance=False, max_sequence_length=12)
    assert torch.equal(policy.negative_cond(2)["embeds"], neg_embeds)


def _sde_rollout(policy, guidance, seed=0):
    g = torch.Generator().manual_seed(seed)
    entries = [{"prompt": p} for p in PROMPTS for _ in range(2)]
    x = group_noise(2, 2, policy.latent_shape(), generator=g, shared=False)
    sigmas = policy.sigmas(3)
    return policy.rollout([e["prompt"] for e in entries], entries, torch.arange(2).repeat_interleave(2), x,
                          sigmas=sigmas, sde_mask=torch.ones(3, dtype=torch.bool), guidance=guidance,
                          kind="flow_sde", noise_level=0.7, generator=g)


@pytest.mark.parametrize("name", FAMILY_NAMES)
@pytest.mark.parametrize("guidance", [1.0, 3.0])
@pytest.mark.parametrize("autocast", [None, torch.bfloat16])
def test_importance_ratio_is_one_on_the_first_inner_step(models, name, guidance, autocast):
    policy = _policy(models, name, micro_batch=2)
    policy.autocast = autocast  # the real-model presets train in bf16
    ro = _sde_rollout(policy, guidance)
    assert ro.images.shape == (4, 3, IMAGE_SIZE, IMAGE_SIZE)
    assert ro.log_probs.abs().min() > 0
    for start in (0, 2):  # the rollout's micro-batches
        for j in range(3):
            logp, _, _ = policy.step_log_prob(ro, slice(start, start + 2), j, guidance)
            ratio = torch.exp(logp - ro.log_probs[start : start + 2, j])
            assert (ratio - 1).abs().max() < 1e-5


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_lora_export_loads_into_a_fresh_pipeline(models, name, tmp_path):
    policy = _policy(models, name, micro_batch=2)
    policy.add_lora(4)
    params = policy.trainable_parameters()
    assert params and all("lora" in n for n, p in policy.transformer.named_parameters() if p.requires_grad)
    ro = _sde_rollout(policy, 1.0)
    adv = compute_advantages("grpo", torch.tensor([0.1, 0.9, 0.4, 0.2]), ro.group_ids)
    cfg = TrainConfig(prompts_per_iter=2, group_size=2, micro_batch=2, optimizer_steps=1, lr=3e-2)
    one_update(policy, torch.optim.AdamW(params, lr=cfg.lr), ro, adv, torch.arange(3), cfg)
    policy.save(tmp_path / "lora")

    fresh = DiffusionPipeline.from_pretrained(models[name], **empty_components(models[name]))
    x, sigma = ro.latents[:, 1], ro.sigmas[1].expand(4)
    cond = policy.cond(ro.prompts)
    spec = dict(dtype=policy.transformer.dtype, config=policy.transformer.config)
    with torch.no_grad():
        base = policy.family.velocity(fresh.transformer, x, sigma, cond, **spec)
        trained = policy.family.velocity(policy.transformer, x, sigma, cond, **spec)
        fresh.load_lora_weights(tmp_path / "lora")
        loaded = policy.family.velocity(fresh.transformer, x, sigma, cond, **spec)
    assert (trained - base).abs().max() > 1e-3  # the update moved the policy
    assert (loaded - trained).abs().max() < 1e-5


class Brightness(Reward):
    """Mean pixel value: a real, cheap reward any image model can be trained on."""

    name = "brightness"

    def score(self, images, prompts, metadata):
        return images.mean(dim=(1, 2, 3))


register_reward("brightness", Brightness, overwrite=True)


def _train_cfg(models, name, out, prompts, eval_prompts, iterations):
    return TrainConfig(model=str(models[name]), family_options=OPTIONS[name], height=IMAGE_SIZE, width=IMAGE_SIZE,
                       lora_rank=0 if name == "sd3" else 4, prompts=str(prompts), eval_prompts=str(eval_prompts),
                       reward="brightness", out=str(out), iterations=iterations, prompts_per_iter=2, group_size=2,
                       micro_batch=2, num_steps=2, guidance=2.0, eval_num_steps=2, eval_images_per_prompt=1,
                       eval_every=100, save_every=1, log_with="", strategy="flow_grpo", sde_steps=0,
                       ema_decay=0.9)


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_train_iteration_save_and_exact_resume(models, name, tmp_path):
    prompts, eval_prompts = tmp_path / "train.txt", tmp_path / "eval.txt"
    prompts.write_text("a red circle\nblue square on the right\na cat\n")
    eval_prompts.write_text("a green triangle\na dog\n")
    straight = train(_train_cfg(models, name, tmp_path / "a", prompts, eval_prompts, 2))
    train(_train_cfg(models, name, tmp_path / "b", prompts, eval_prompts, 1))
    resumed = train(_train_cfg(models, name, tmp_path / "b", prompts, eval_prompts, 2))
    assert straight["iterations"] == resumed["iterations"] == 2
    last = [tmp_path / run / "checkpoints" / "iter-000002" for run in "ab"]
    for f in ("weights.safetensors", "ema.safetensors"):
        weights = [(ck / f).read_bytes() for ck in last]
        assert weights[0] == weights[1]  # 1 + 1 resumed iterations == 2 straight, bit for bit
    states = [json.loads((ck / "state.json").read_text()) for ck in last]
    assert [h["reward_mean"] for h in states[0]["history"]["train"]] == \
        [h["reward_mean"] for h in states[1]["history"]["train"]]
    base, last = straight["base"], straight["trained"]
    assert 0 < base["reward"] < 1 and base["n_images"] == 2 and last["iteration"] == 2
    assert (tmp_path / "a" / "eval" / "base" / "grid.png").is_file()
    final = tmp_path / "a" / "final"
    assert (final / "pytorch_lora_weights.safetensors").is_file() if name != "sd3" else \
        (final / "model_index.json").is_file()


@pytest.mark.parametrize("preset", ["sd35-medium-nft", "sd35-medium-awm"])
def test_the_forward_process_presets_train_sd3_with_their_lora(models, preset, tmp_path):
    """The SD3.5-M recipes of DiffusionNFT and AWM, at their LoRA (rank 32, alpha 64: scale 2), CFG-free sampling
    and solver, shrunk to the tiny SD3: an iteration trains the adapters and the export loads."""
    prompts = tmp_path / "train.txt"
    prompts.write_text("a red circle\nblue square on the right\n")
    small = {"model": str(models["sd3"]), "family_options": OPTIONS["sd3"], "height": IMAGE_SIZE, "width": IMAGE_SIZE,
             "prompts": str(prompts), "eval_prompts": str(prompts), "reward": "brightness", "out": str(tmp_path / "r"),
             "iterations": 1, "prompts_per_iter": 2, "group_size": 2, "micro_batch": 2, "num_steps": 4,
             "eval_num_steps": 2, "eval_images_per_prompt": 1, "log_with": "", "precision": "fp32"}
    summary = train(make_config(preset, overrides=small))
    assert summary["iterations"] == 1
    weights = load_file(tmp_path / "r" / "final" / "pytorch_lora_weights.safetensors")
    assert weights and any(float(w.abs().max()) > 0 for k, w in weights.items() if "lora_B" in k)
    lora = json.loads((tmp_path / "r" / "config.json").read_text())
    assert (lora["lora_rank"], lora["lora_alpha"]) == (32, 64)
