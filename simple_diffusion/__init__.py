"""simple_diffusion: denoising diffusion models, derived and measured.

The package exported from the notebooks of the simple_diffusion book. The names a user starts
from are available here directly (imported lazily, on first use, so that
`import simple_diffusion` stays fast):

    import simple_diffusion as sd
    model, schedule, config = sd.pretrained.load("digits")
    x = sd.sample(model, schedule, (64, 1, 8, 8), "ddim", 50, clip_denoised=True)

Modules, one per chapter: core, data, schedules, forward, posterior, parameterization, oracle, elbo,
nets, training, sampling, pretrained, cli, interop (diffusers; `NoiseSchedule.from_diffusers`
exists once it is imported, e.g. through `sd.to_diffusers`), metrics, guidance, inverse, augment,
challenges, signals, discrete, future.
This file is written by hand (nbdev keeps it and updates `__version__`); every other module is
generated from its notebook.
"""
__version__ = "0.1.0"

import importlib

_EXPORTS = {  # name -> the module that defines it
    "NoiseSchedule": "schedules", "get_beta_schedule": "schedules", "SCHEDULES": "schedules",
    "q_sample": "forward", "load_digits": "data", "make_toy": "data", "toy_mixture": "data",
    "GaussianMixture": "data", "load_training_data": "data", "GaussianMixtureOracle": "oracle",
    "simple_loss": "elbo", "elbo_bpd": "elbo", "MLPDenoiser": "nets", "UNet": "nets",
    "make_unet": "nets", "build_model": "nets", "TrainConfig": "training", "Trainer": "training",
    "train": "training", "load_trained": "training", "sample": "sampling", "respace": "sampling",
    "evaluate_samples": "metrics", "frechet_distance": "metrics", "pick_device": "core",
    "load_image_folder": "data", "load_mnist": "data", "guided_sample": "guidance",
    "augment_dataset": "augment", "vary": "augment", "to_diffusers": "interop",
    "DiffusersUNet": "interop",
}
_MODULES = ("core", "data", "schedules", "forward", "posterior", "parameterization", "oracle",
            "elbo", "nets", "training", "sampling", "pretrained", "cli", "interop", "metrics",
            "guidance", "inverse", "augment", "challenges", "signals", "discrete", "future")
__all__ = sorted(_EXPORTS) + list(_MODULES)


def __getattr__(name):
    "Import a re-exported name (or a submodule) on first use (PEP 562)."
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    elif name in _MODULES:
        value = importlib.import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module 'simple_diffusion' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
