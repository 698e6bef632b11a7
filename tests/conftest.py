"""Shared fixtures: a tiny random LLaMA (fast, no download) and the real default model (slow tests only)."""

from __future__ import annotations

import pytest
import torch

from service.models import LoadedModel, load_model, save_tiny_llama, tiny_llama


@pytest.fixture(scope="session")
def tiny() -> LoadedModel:
    """tiny_llama(seed=0): 2 layers, d_model 64, byte tokenizer. Treat as read-only (shared by the session)."""
    return tiny_llama(seed=0)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory):
    """A Hugging Face checkpoint directory holding the same model as ``tiny``."""
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), seed=0)


@pytest.fixture(scope="session")
def _default_model_session() -> LoadedModel:
    return load_model("default", progress=False)


@pytest.fixture
def default_model(request: pytest.FixtureRequest) -> LoadedModel:
    """The real default model (Gemma 3 270M), loaded once per session; only for @pytest.mark.slow tests."""
    if request.node.get_closest_marker("slow") is None:
        pytest.fail(f"{request.node.nodeid} uses default_model and must be marked @pytest.mark.slow")
    return request.getfixturevalue("_default_model_session")


@pytest.fixture
def single_thread():
    """torch on one thread for the test: on tiny tensors thread spin-up costs more than it saves, badly
    so on a loaded 2-core machine (restored afterwards)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
