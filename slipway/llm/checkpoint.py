"""One loader for every causal LM slipway touches: a Hugging Face model directory or a PEFT adapter directory,
as a local path, a ``file://`` URI or an ``s3://`` prefix (downloaded through the artifact store into a cache,
every file sha256-verified)::

    model, tok = load_causal_lm("s3://models/tiny-demo/3/adapter")   # base loaded and adapter merged
    model, tok = load_version(registry, "tiny-demo@production")        # through the registry

Tokenizers come back with left padding and a pad token, ready for batched generation.
"""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from slipway.errors import SlipwayError

if TYPE_CHECKING:
    from slipway.registry import Registry

log = logging.getLogger(__name__)

#: Written by slipway beside an adapter: where its base lives, so the adapter loads anywhere the base can.
LINEAGE_FILE = "slipway.json"
#: Artifact kinds, in the order a version's loadable directory is looked for.
LOADABLE_KINDS = ("model", "adapter")


class ModelLoadError(SlipwayError):
    """A model directory cannot be loaded (missing, not a causal LM, adapter without a reachable base)."""


def pick_device(device: str | None = None) -> str:
    """``device`` if given, else ``cuda`` when available, else ``cpu``."""
    if device:
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def pick_dtype(device: str, dtype: Any = None) -> Any:
    """``dtype`` if given (a torch dtype or its name), else bf16 on a CUDA device that supports it, else fp32."""
    import torch

    if isinstance(dtype, str):
        return getattr(torch, dtype)
    if dtype is not None:
        return dtype
    if device.startswith("cuda") and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def local_dir(uri: str, *, sha256: str | None = None) -> Path:
    """A verified local directory for ``uri`` (see :func:`slipway.artifacts.materialize_dir`)."""
    from slipway.artifacts import materialize_dir

    return materialize_dir(uri, sha256=sha256)


def load_tokenizer(path: Path) -> Any:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path))
    tok.padding_side = "left"  # batched generation: prompts end at the same position
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_causal_lm(
    uri: str,
    *,
    device: str | None = None,
    dtype: Any = None,
    sha256: str | None = None,
    merge: bool = True,
    trainable: bool = False,
) -> tuple[Any, Any]:
    """Load ``(model, tokenizer)`` from a model or adapter directory at ``uri``.

    An adapter directory (``adapter_config.json``) loads its base first — from ``slipway.json``'s
    ``base_uri`` (pinned by ``base_sha256``) when slipway wrote it, else from the adapter's
    ``base_model_name_or_path`` — then attaches the adapter and, with ``merge``, folds it into the weights.
    The model is in eval mode unless ``trainable``. ``sha256`` pins the directory's manifest.

    Raises :class:`ModelLoadError`, or :class:`~slipway.artifacts.ChecksumMismatch` when a file was altered.
    """
    path = local_dir(uri, sha256=sha256)
    dev = pick_device(device)
    torch_dtype = pick_dtype(dev, dtype)
    # transformers builds models under process-wide patches (meta-device init): two loads at once in threads
    # of one process (parallel pipeline steps) corrupt each other, so loads are serialised.
    with _LOAD_LOCK:
        return _load(path, uri, dev, torch_dtype, merge=merge, trainable=trainable)


_LOAD_LOCK = threading.Lock()


def _load(path: Path, uri: str, dev: str, torch_dtype: Any, *, merge: bool, trainable: bool) -> tuple[Any, Any]:
    if (path / "adapter_config.json").is_file():
        model, tok = _load_adapter(path, uri, device=dev, dtype=torch_dtype, merge=merge, trainable=trainable)
    elif (path / "config.json").is_file():
        model, tok = _load_full(path, uri, device=dev, dtype=torch_dtype), load_tokenizer(path)
    else:
        raise ModelLoadError(f"{uri}: neither a model (config.json) nor an adapter (adapter_config.json) directory")
    if not trainable:
        model.eval()
    if getattr(model, "generation_config", None) is not None and model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tok.pad_token_id
    return model, tok


def _load_full(path: Path, uri: str, *, device: str, dtype: Any) -> Any:
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{uri}: cannot load a causal LM: {str(e).splitlines()[0]}") from e
    return model.to(device)


def read_lineage(path: Path) -> dict[str, Any]:
    f = path / LINEAGE_FILE
    return json.loads(f.read_text()) if f.is_file() else {}


def _load_adapter(path: Path, uri: str, *, device: str, dtype: Any, merge: bool, trainable: bool) -> tuple[Any, Any]:
    from peft import PeftModel

    lineage = read_lineage(path)
    base_uri = lineage.get("base_uri")
    base_sha = lineage.get("base_sha256")
    if not base_uri:
        cfg = json.loads((path / "adapter_config.json").read_text())
        base_uri = cfg.get("base_model_name_or_path")
    if not base_uri:
        raise ModelLoadError(f"{uri}: adapter names no base model (slipway.json base_uri or base_model_name_or_path)")
    try:
        base_path = local_dir(base_uri, sha256=base_sha)
    except SlipwayError as e:
        raise ModelLoadError(f"{uri}: its base {base_uri} cannot be loaded: {e}") from e
    base = _load_full(base_path, base_uri, device=device, dtype=dtype)
    tok = load_tokenizer(path if (path / "tokenizer_config.json").is_file() else base_path)
    model = PeftModel.from_pretrained(base, str(path), is_trainable=trainable)
    if merge and not trainable:
        model = model.merge_and_unload()
    return model.to(device), tok


def version_artifact(reg: Registry, ref: str) -> tuple[str, str, str]:
    """``(version ref, uri, sha256)`` of the loadable directory of ``ref`` (``model:3``, ``model@production``)."""
    from slipway.registry import catalog

    with reg.session() as s:
        mv = catalog.resolve(s, ref)
        by_kind = {a.kind: a for a in mv.artifacts}
        for kind in LOADABLE_KINDS:
            if kind in by_kind:
                return mv.ref, by_kind[kind].uri, by_kind[kind].sha256
        kinds = ", ".join(sorted(by_kind)) or "none"
        raise ModelLoadError(f"{mv.ref} has no model or adapter artifact (it has: {kinds})")


def load_version(reg: Registry, ref: str, *, device: str | None = None, dtype: Any = None) -> tuple[Any, Any]:
    """Load the model of registry version ``ref``, verified against the sha256 the registry recorded."""
    _ref, uri, sha = version_artifact(reg, ref)
    return load_causal_lm(uri, device=device, dtype=dtype, sha256=sha)
