"""diffusers interop: schedule parity and round trips, prediction types, and our samplers on a
diffusers UNet2DModel against diffusers' own scheduler loops (skipped cleanly without diffusers)."""
import warnings

import pytest
import torch

try:  # pytest.importorskip, also for an installed diffusers that fails to import (ImportError)
    import diffusers  # noqa: F401
except ImportError as e:
    pytest.skip(f"needs diffusers: pip install 'simple_diffusion[diffusers]' ({e})",
                allow_module_level=True)
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel  # noqa: E402

from simple_diffusion.interop import (PREDICTION_TO_DIFFUSERS, DiffusersUNet,  # noqa: E402
                                      diffusers_sample_kwargs, to_diffusers)
from simple_diffusion.inverse import image_task, solve_inverse  # noqa: E402
from simple_diffusion.parameterization import PREDICTIONS  # noqa: E402
from simple_diffusion.sampling import SamplingWarning, sample  # noqa: E402
from simple_diffusion.schedules import (NoiseSchedule, cosine_betas, linear_betas,  # noqa: E402
                                        quadratic_betas)

NAMES = ("linear", "scaled_linear", "squaredcos_cap_v2")


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    "Tiny UNets: one intra-op thread (the conftest fixture)."


def tiny_unet(num_class_embeds=None, out_channels=1, seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=out_channels, block_out_channels=(8, 16),
                       layers_per_block=1, down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4,
                       num_class_embeds=num_class_embeds).eval()
    return unet.double() if dtype == torch.float64 else unet


@torch.no_grad()
def diffusers_loop(unet, scheduler, x_T, steps, seed, y=None, cfg_scale=None, null=None):
    "DDPMPipeline/DDIMPipeline's loop (and diffusers-style classifier-free guidance)."
    scheduler.set_timesteps(steps)
    g, x = torch.Generator().manual_seed(seed), x_T.clone()
    kw = {"use_clipped_model_output": True} if isinstance(scheduler, DDIMScheduler) else {}
    for t in scheduler.timesteps:
        out = unet(x, t, class_labels=y).sample
        if cfg_scale is not None:
            un = unet(x, t, class_labels=torch.full_like(y, null)).sample
            out = un + cfg_scale * (out - un)
        x = scheduler.step(out, t, x, generator=g, **kw).prev_sample
    return x


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("T", [1000, 50])
def test_from_diffusers_betas_exact_alphas_cumprod_to_float32(name, T):
    d = DDPMScheduler(num_train_timesteps=T, beta_schedule=name,
                      **({"beta_end": 0.2} if T == 50 else {}))
    s = NoiseSchedule.from_diffusers(d)
    assert s.num_timesteps == T and s.betas.dtype == torch.float64
    assert torch.equal(s.betas, d.betas.double())
    # ours: float64 cumulative product of the same betas (an independent cumprod, not our log1p sum)
    torch.testing.assert_close(s.alphas_cumprod, torch.cumprod(1 - d.betas.double(), 0), rtol=1e-13, atol=0)
    # diffusers' float32 table: T roundings of 2^-24 each at most
    rel = ((s.alphas_cumprod - d.alphas_cumprod.double()) / s.alphas_cumprod).abs().max()
    assert rel < T * 2.0**-24
    # and the schedule of the same name here, to float32 rounding (linspace, squared for scaled_linear)
    c = d.config
    ours = {"linear": lambda: linear_betas(T, c.beta_start, c.beta_end),
            "scaled_linear": lambda: quadratic_betas(T, c.beta_start, c.beta_end),
            "squaredcos_cap_v2": lambda: cosine_betas(T)}[name]()
    assert ((s.betas - ours) / ours).abs().max() < 8 * 2.0**-24


@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("kind", ["ddpm", "ddim"])
def test_round_trips_exact(prediction, kind):
    s = NoiseSchedule.from_name("cosine", 200)
    d = to_diffusers(s, prediction, kind, clip_denoised=True)
    assert isinstance(d, DDPMScheduler if kind == "ddpm" else DDIMScheduler)
    assert d.config.prediction_type == PREDICTION_TO_DIFFUSERS[prediction] and d.config.clip_sample
    back = NoiseSchedule.from_diffusers(d)
    assert torch.equal(back.betas, s.betas)                                     # float64, bit for bit
    for table in NoiseSchedule.TABLES:
        assert torch.equal(getattr(back, table), getattr(s, table)), table
    assert torch.equal(d.betas, s.betas.float())
    assert torch.equal(NoiseSchedule.from_diffusers(dict(d.config)).betas, s.betas)  # a config dict
    assert diffusers_sample_kwargs(d) == {"prediction": prediction, "clip_denoised": True, "spacing": "leading"}
    # diffusers -> ours -> diffusers: the same float32 tables diffusers computes with
    d0 = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    d1 = to_diffusers(NoiseSchedule.from_diffusers(d0), "eps", "ddim")
    assert torch.equal(d1.betas, d0.betas) and torch.equal(d1.alphas_cumprod, d0.alphas_cumprod)


def test_prediction_mapping_and_config_reading():
    assert PREDICTION_TO_DIFFUSERS == {"eps": "epsilon", "x0": "sample", "v": "v_prediction"}
    d = DDIMScheduler(prediction_type="v_prediction", timestep_spacing="trailing", clip_sample=False)
    assert diffusers_sample_kwargs(d) == {"prediction": "v", "clip_denoised": False, "spacing": "trailing"}
    sd = DDIMScheduler(steps_offset=1)                       # Stable Diffusion's offset: no spacing here
    assert "spacing" not in diffusers_sample_kwargs(sd)


def test_zero_terminal_snr_scheduler():
    d = DDPMScheduler(beta_schedule="linear", rescale_betas_zero_snr=True, prediction_type="v_prediction")
    s = NoiseSchedule.from_diffusers(d)
    assert torch.equal(s.betas, d.betas.double()) and float(s.alphas_cumprod[-1]) == 0.0


def test_bad_inputs():
    s = NoiseSchedule.from_name("linear", 100)
    with pytest.raises(ValueError, match="prediction"):
        to_diffusers(s, "score")
    with pytest.raises(ValueError, match="scheduler"):
        to_diffusers(s, "eps", "euler")
    from simple_diffusion.sampling import respace
    with pytest.raises(ValueError, match="parent"):
        to_diffusers(respace(s, 10))
    with pytest.raises(ValueError, match="scheduler"):
        NoiseSchedule.from_diffusers(object())
    with pytest.raises(ValueError, match="prediction_type"):
        diffusers_sample_kwargs({"prediction_type": "flow"})
    with pytest.raises(ValueError, match="clip_sample_range"):
        diffusers_sample_kwargs({"clip_sample": True, "clip_sample_range": 2.0})
    with pytest.raises(ValueError, match="unet"):
        DiffusersUNet(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="num_classes"):
        DiffusersUNet(tiny_unet(num_class_embeds=4), num_classes=5)
    with pytest.raises(ValueError, match="y"):
        DiffusersUNet(tiny_unet())(torch.zeros(2, 1, 8, 8), torch.zeros(2, dtype=torch.long), y=torch.zeros(2))
    no_null = DiffusersUNet(tiny_unet(num_class_embeds=3), num_classes=3)
    with pytest.raises(ValueError, match="null class"):
        no_null(torch.zeros(2, 1, 8, 8), torch.zeros(2, dtype=torch.long))


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("name", NAMES)
def test_sampling_parity_float32(sampler, prediction, name):
    "Our sample() on the adapted UNet = diffusers' scheduler loop on the same UNet, x_T and noise seed."
    cls = DDIMScheduler if sampler == "ddim" else DDPMScheduler
    d = cls(beta_schedule=name, prediction_type=PREDICTION_TO_DIFFUSERS[prediction], clip_sample=True)
    unet = tiny_unet()
    x_T = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    ref = diffusers_loop(unet, d, x_T, 10, seed=2)
    ours = sample(DiffusersUNet(unet), NoiseSchedule.from_diffusers(d), x_T.shape, sampler, steps=10,
                  noise=x_T, generator=torch.Generator().manual_seed(2), **diffusers_sample_kwargs(d))
    # float32: diffusers' float32 ᾱ table against our float64 one is the only difference (the float64
    # test below shows the arithmetic is the same); it is largest for cosine, whose float32 ᾱ is off
    # by up to 1.3e-5 relative at T = 1000, and an x0-model, whose ε̂ = (x - √ᾱ x̂0)/√(1-ᾱ) carries it
    tol = 2e-5 if (name, prediction) == ("squaredcos_cap_v2", "x0") else 1e-5
    assert (ours - ref).abs().max() < tol


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("clip", [False, True])
def test_sampling_parity_float64(sampler, prediction, clip):
    "In float64 (UNet, noise and diffusers' ᾱ table) the two loops are the same arithmetic."
    cls = DDIMScheduler if sampler == "ddim" else DDPMScheduler
    d = cls(beta_schedule="squaredcos_cap_v2", prediction_type=PREDICTION_TO_DIFFUSERS[prediction],
            clip_sample=clip)
    d.alphas_cumprod = torch.cumprod(1 - d.betas.double(), 0)
    unet = tiny_unet(dtype=torch.float64)
    x_T = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    ref = diffusers_loop(unet, d, x_T, 8, seed=6)
    with warnings.catch_warnings():        # an untrained ε-model without clipping may run far out
        warnings.simplefilter("ignore", SamplingWarning)
        ours = sample(DiffusersUNet(unet), NoiseSchedule.from_diffusers(d), x_T.shape, sampler, steps=8,
                      noise=x_T, generator=torch.Generator().manual_seed(6), **diffusers_sample_kwargs(d))
    assert ours.dtype == torch.float64
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-11)


def test_class_conditional_guidance_parity():
    unet = tiny_unet(num_class_embeds=4)
    model = DiffusersUNet(unet)
    assert model.num_classes == 3
    s = NoiseSchedule.from_name("cosine", 1000)
    d = to_diffusers(s, "eps", "ddim", clip_denoised=True)
    y = torch.tensor([0, 1, 2, 1])
    x_T = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    for w in (0.0, 2.0):
        ours = sample(model, s, x_T.shape, "ddim", steps=10, spacing="leading", noise=x_T, y=y,
                      guidance=w, clip_denoised=True)
        ref = diffusers_loop(unet, d, x_T, 10, seed=0, y=y, cfg_scale=1 + w, null=3)
        assert (ours - ref).abs().max() < 1e-5
    # the null class is the default label: an unconditional call = labels K
    t = torch.full((4,), 500)
    torch.testing.assert_close(model(x_T, t), unet(x_T, t, class_labels=torch.full((4,), 3)).sample)


def test_inverse_solvers_and_classifier_guidance_take_the_adapter():
    model = DiffusersUNet(tiny_unet())
    s = NoiseSchedule.from_name("cosine", 1000)
    x0 = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    op = image_task("bottom half", (1, 8, 8))
    for method in ("replacement", "pigdm"):
        x = solve_inverse(model, s, op, op.A(x0), method, steps=5, clip_denoised=True,
                          generator=torch.Generator().manual_seed(1))
        assert x.shape == x0.shape and torch.isfinite(x).all()
        if method == "replacement":                      # the known pixels are kept exactly
            torch.testing.assert_close(op.A(x), op.A(x0))


def test_learned_variance_unet_passes_through():
    model = DiffusersUNet(tiny_unet(out_channels=2))
    s = NoiseSchedule.from_name("linear", 100)
    x = sample(model, s, (2, 1, 8, 8), "ddpm", steps=5, spacing="leading", variance="learned_range",
               clip_denoised=True, generator=torch.Generator().manual_seed(0))
    assert x.shape == (2, 1, 8, 8) and torch.isfinite(x).all()


def test_without_diffusers_the_message_says_how_to_install(monkeypatch):
    import builtins
    real = builtins.__import__

    def no_diffusers(name, *a, **k):
        if name == "diffusers" or name.startswith("diffusers."):
            raise ModuleNotFoundError("No module named 'diffusers'", name="diffusers")
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_diffusers)
    with pytest.raises(ImportError, match=r"simple_diffusion\[diffusers\]"):
        to_diffusers(NoiseSchedule.from_name("cosine", 10))
    with pytest.raises(ImportError, match=r"simple_diffusion\[diffusers\]"):
        NoiseSchedule.from_diffusers({"num_train_timesteps": 10})
