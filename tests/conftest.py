import warnings

import pytest
import torch

warnings.filterwarnings("ignore", message=".*requires torchvision.*")
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture
def sd1():
    from sliders_core.backends.diffusers_backend import DiffusersDenoiser
    from sliders_core.tiny import tiny_sd1_pipeline

    return DiffusersDenoiser(tiny_sd1_pipeline(seed=0))


@pytest.fixture
def sdxl():
    from sliders_core.backends.diffusers_backend import DiffusersDenoiser
    from sliders_core.tiny import tiny_sdxl_pipeline

    return DiffusersDenoiser(tiny_sdxl_pipeline(seed=0))


@pytest.fixture(scope="session")
def sd1_folder(tmp_path_factory):
    from sliders_core.tiny import save_tiny_model

    return save_tiny_model("sd1", tmp_path_factory.mktemp("models") / "tiny-sd1")


def random_slider(denoiser, name="s", layers="noxattn", rank=2, alpha=1.0, seed=0, scale=0.5):
    """Attach a slider with non-zero random weights (a trained slider stand-in) and return its weights."""
    from sliders_core.text_slider import slider_modules

    denoiser.sliders.add(name, modules=slider_modules(denoiser, layers), rank=rank, alpha=alpha)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in denoiser.sliders.parameters(name):
            p.copy_(torch.randn(p.shape, generator=gen) * scale)
    return denoiser.sliders.export(name)
