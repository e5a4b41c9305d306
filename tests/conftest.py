"""Shared test setup: everything must work offline (no HF hub), so make any hub access fail loudly."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

# Triton kernels run on CPU tensors through Triton's interpreter; triton.jit reads this variable when a
# kernel module is imported, so it must be set before any test imports textcraftor_fast.kernels.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The test models are tiny: one intra-op thread is as fast as two, and with any other load on a 2-core box
# OpenMP's spin-waiting makes a second thread 10-100x slower (measured: a tiny UNet call 0.025 s vs 2 s).
if "OMP_NUM_THREADS" not in os.environ:
    torch.set_num_threads(1)


import pytest  # noqa: E402


@pytest.fixture
def hide_native_library(monkeypatch, tmp_path):
    """The package as on a machine where `make ext` never ran: the native library's path holds no file."""
    from textcraftor_fast.ops import native

    monkeypatch.setattr(native, "library_path", lambda: tmp_path / native.LIBRARY_NAME)


@pytest.fixture(scope="session")
def tiny_world():
    """The shipped tiny world's components (a real diffusers SD folder, 32x32 images)."""
    from textcraftor_fast.config import ModelConfig
    from textcraftor_fast.models import load_components

    return load_components(ModelConfig(kind="tiny_world", resolution=32))


@pytest.fixture(scope="session")
def tuned_tiny_world_encoder(tiny_world):
    """A "tuned" tiny-world encoder: every weight moved by 0.2 x its tensor's std x fixed noise (seed 1234),
    enough to change every image visibly (tests/models/test_export_stock_diffusers.py checks it does)."""
    import copy

    tuned = copy.deepcopy(tiny_world.text_encoder)
    g = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for p in tuned.parameters():
            p.add_(0.2 * p.std().nan_to_num() * torch.randn(p.shape, generator=g))
    return tuned


@pytest.fixture(scope="session")
def tuned_tiny_world_lora(tiny_world):
    """A "UNet-stage" result: the tiny world's UNet with LoRA adapters (rank 4, alpha 8: a scale of 2, which only
    survives an export that records alpha) whose up matrices moved by fixed noise (seed 4321), enough to change
    every image visibly (tests/models/test_export_stock_diffusers.py checks it does)."""
    import copy

    from textcraftor_fast.models.lora import add_lora

    unet = copy.deepcopy(tiny_world.unet)
    add_lora(unet, rank=4, alpha=8.0, target_modules=("to_k", "to_q", "to_v", "to_out.0"))
    g = torch.Generator().manual_seed(4321)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    return unet.eval().requires_grad_(False)


@pytest.fixture(scope="session")
def make_encoder_lora():
    """make(encoder, seed, rank, alpha, targets, std): a copy of `encoder` with LoRA adapters whose up matrices are
    `std` x fixed noise (seed): an "encoder-stage LoRA result" that changes the embedding visibly."""
    import copy

    from textcraftor_fast.models.encoder_lora import add_encoder_lora

    def make(encoder, seed: int, rank: int, alpha: float, targets: tuple[str, ...], std: float):
        adapted = copy.deepcopy(encoder)
        add_encoder_lora(adapted, rank, alpha, targets)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in adapted.named_parameters():
                if "lora_B" in name:
                    p.copy_(std * torch.randn(p.shape, generator=g))
        return adapted

    return make


def _file_minutes(item: pytest.Item) -> float:
    marker = item.get_closest_marker("slow")
    return 0.0 if marker is None else float(marker.kwargs.get("minutes", 1))


def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list[pytest.Item]) -> None:
    """Longest files first. `make test` runs pytest-xdist with `--dist loadfile`: each worker takes the next whole
    file in collection order, so a long file collected last (tests/tiny sorts late) would run alone after
    everything else and set the suite's wall time. Items stay together and in order within their file."""
    minutes: dict = {}
    for item in items:
        minutes[item.path] = max(minutes.get(item.path, 0.0), _file_minutes(item))
    items.sort(key=lambda item: -minutes[item.path])  # stable: ties keep pytest's order
