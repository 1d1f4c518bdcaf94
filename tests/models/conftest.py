"""Session fixture: each tiny Hugging Face variant (hf_models.py) saved once as a safetensors checkpoint."""

import pytest
from hf_models import build_hf_model


@pytest.fixture(scope="session")
def hf_checkpoint(tmp_path_factory):
    """hf_checkpoint(name) -> (directory, torch model): the variant saved with safetensors."""
    built: dict = {}

    def get(name: str):
        if name not in built:
            model = build_hf_model(name)
            path = tmp_path_factory.mktemp(name)
            model.save_pretrained(path)  # transformers 5 writes safetensors only
            built[name] = (path, model)
        return built[name]

    return get
