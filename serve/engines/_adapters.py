"""LoRA adapters of the ``hf`` engine's base model, per request, in one running continuous batch.

PEFT serves several adapters in one batch with ``adapter_names=`` (one name per row of the batch dimension), but
transformers' continuous batching packs every request of a step (prefill chunks and decodes alike) into one
sequence of shape ``[1, tokens]``: there is one row, and PEFT's per-row grouping cannot tell the requests apart.
So PEFT reads the adapter (``inject_adapter_in_model`` and ``set_peft_model_state_dict``: its config, target
modules, rank and alpha patterns, weights), each adapted layer's factors are taken from PEFT's layers, and the
model's own layers are put back: no PEFT wrapper stays in the model. A forward hook on each adapted layer adds
``x @ A.T @ (scaling * B).T`` (PEFT's vanilla LoRA) to the token rows of the requests that asked for the adapter:

- before each step the engine calls :meth:`Adapters.route` with the step's requests in the order the manager
  packed them (each contributes ``query_length`` consecutive tokens): one row mask per adapter present (none when
  one adapter has every row), built once per step and shared by every layer: an adapted layer then costs three
  small kernels per adapter present (every row through A, the other rows masked, B added in place). A step without
  an adapter request sets nothing, and an adapted layer costs its hook's call and one check;
- an adapter request never shares KV-cache pages by prefix (its keys and values are not the base model's for the
  same tokens): its prompt is not matched against the cache and its blocks are not offered to others;
- loading and unloading add or remove the factors and hooks under the model lock, between two steps of the
  batch: the manager is not restarted and the requests in flight are not disturbed (a base request's rows get no
  delta, and a new adapter has no request yet). An adapter is unloaded once the requests using it have finished;
  the last one unloaded leaves the model exactly as it was loaded.

What per-token routing cannot express is refused when the adapter is loaded (400): anything but plain LoRA on
linear layers inside the model (DoRA, LoRA biases, ``modules_to_save``, trainable tokens, embedding or output-head
adapters, whose rows are not the step's token rows).
"""

from __future__ import annotations

import itertools
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from slipway.serve.engines.base import EngineError


@dataclass(frozen=True)
class AdapterInfo:
    """One loaded adapter: its name, where it came from, its rank and alpha, and how many layers it adapts."""

    name: str
    path: str
    rank: int
    alpha: float
    layers: int
    loaded_at: float

    def as_dict(self, in_flight: int) -> dict[str, Any]:
        return {
            "path": self.path,
            "rank": self.rank,
            "alpha": self.alpha,
            "layers": self.layers,
            "loaded_at": self.loaded_at,
            "in_flight": in_flight,
        }


class _Route:
    """Which token rows of the current forward pass use which adapter: ``groups`` of (adapter slot, a ``[rows, 1]``
    mask of 1 on its rows and 0 elsewhere, or None for every row); ``tokens`` is the rows the pass has (None: not
    checked)."""

    __slots__ = ("groups", "tokens")

    def __init__(self, groups: list[tuple[str, torch.Tensor | None]], tokens: int | None) -> None:
        self.groups, self.tokens = groups, tokens


class Adapters:
    """The adapters loaded into one model. ``model_lock`` is the lock the decode loop holds around each step."""

    def __init__(self, model: Any, model_lock: threading.Lock) -> None:
        self.model, self.model_lock = model, model_lock
        self.loaded: dict[str, AdapterInfo] = {}
        self._slot: dict[str, str] = {}  # adapter name → its slot, PEFT's name for it (module keys take few names)
        self._draining: set[str] = set()
        self._in_flight: dict[str, int] = {}
        self._of_request: dict[str, str] = {}  # manager request id → adapter slot, while the manager has the request
        self._leaving: set[str] = set()  # cancelled requests the manager may still hold for one step
        self._route: _Route | None = None
        self._hooks: dict[int, Any] = {}  # id of an adapted layer → its hook's handle
        self._counter = itertools.count()
        self._admin = threading.Lock()  # one load or unload at a time

    # ------------------------------------------------------------------ loading

    def load(self, name: str, path: str | Path) -> AdapterInfo:
        """Load the PEFT LoRA adapter saved at ``path`` (``save_pretrained``) under ``name``. Blocking: the files
        are read first, then the adapted layers get their factors and hooks between two steps of the batch.

        Raises :class:`EngineError` 409 when ``name`` is loaded already, 400 when the adapter cannot be served
        (not LoRA, a feature per-token routing cannot apply, weights that do not fit the base model)."""
        from peft import LoraConfig, PeftConfig
        from peft.utils import load_peft_weights

        if not name or not isinstance(name, str):
            raise EngineError(400, f"an adapter needs a name, not {name!r}", param="model")
        with self._admin:
            if name in self.loaded:
                raise EngineError(409, f"adapter {name!r} is loaded already", param="model")
            try:
                config = PeftConfig.from_pretrained(str(path))
                weights = load_peft_weights(str(path), device="cpu")
            except Exception as e:
                raise EngineError(400, f"adapter {name!r}: cannot read a PEFT adapter at {path}: {e}") from e
            if not isinstance(config, LoraConfig):
                raise EngineError(400, f"adapter {name!r} is {config.peft_type}, not LoRA", param="model")
            _check_config(name, config)
            slot = f"slipway{next(self._counter)}"
            with self.model_lock:  # between two steps: no forward pass sees a half-loaded adapter
                try:
                    layers = self._inject(slot, config, weights)
                except EngineError:
                    raise
                except Exception as e:  # PEFT's own errors: target modules not found, shapes that do not match
                    raise EngineError(400, f"adapter {name!r} does not fit this model: {e}", param="model") from e
            info = AdapterInfo(name, str(path), int(config.r), float(config.lora_alpha), len(layers), time.time())
            self._slot[name] = slot
            self._in_flight[name] = 0
            self.loaded[name] = info
            return info

    def _inject(self, slot: str, config: Any, weights: dict[str, torch.Tensor]) -> list[str]:
        """Read the adapter into the model with PEFT, take each adapted layer's factors, and put the model's own
        layers back: the model keeps no PEFT wrapper, and the adapter lives in the hooks of the layers it adapts.
        Returns their names. Called under the model lock; on any error the model is left as it was."""
        from peft.functional import inject_adapter_in_model, set_peft_model_state_dict
        from peft.tuners.lora import Linear as LoraLinear
        from peft.tuners.tuners_utils import BaseTunerLayer

        grads = {n: p.requires_grad for n, p in self.model.named_parameters()}  # PEFT freezes the base's
        had_config = hasattr(self.model, "peft_config")
        try:
            inject_adapter_in_model(config, self.model, adapter_name=slot)
            result: Any = set_peft_model_state_dict(self.model, weights, adapter_name=slot)
            missing = [k for k in result.missing_keys if f".{slot}." in k]
            if result.unexpected_keys or missing:
                keys = (list(result.unexpected_keys) + missing)[:3]
                raise EngineError(400, f"the adapter's weights do not match this model's layers: {keys}", param="model")
            head = self.model.get_output_embeddings()
            factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
            for module_name, layer in self.model.named_modules():
                if not isinstance(layer, BaseTunerLayer):
                    continue
                if not isinstance(layer, LoraLinear) or layer is head:
                    raise EngineError(
                        400,
                        f"the adapter adapts {module_name}, which is not a linear layer inside the model "
                        "(only those can be applied per request in a shared batch)",
                        param="model",
                    )
                # PEFT's vanilla LoRA, lora_B(lora_A(x)) * scaling, as two matrix products (see _hook): the
                # scaling folded into B, both transposed once here
                lora: Any = layer  # PEFT's layers are not typed for mypy
                a, b = lora.lora_A[slot].weight.detach(), lora.lora_B[slot].weight.detach()
                dtype = lora.get_base_layer().weight.dtype  # the layer's own: added in place to its output
                b = b * lora.scaling[slot]
                factors[module_name] = (a.t().contiguous().to(dtype), b.t().contiguous().to(dtype))
        finally:
            _restore_base_layers(self.model)
            for n, p in self.model.named_parameters():
                p.requires_grad_(grads.get(n, p.requires_grad))
            if not had_config and hasattr(self.model, "peft_config"):
                del self.model.peft_config
        for module_name, ab in factors.items():
            module = self.model.get_submodule(module_name)
            held = module.__dict__.setdefault("slipway_lora", {})
            held[slot] = ab
            if id(module) not in self._hooks:
                self._hooks[id(module)] = module.register_forward_hook(self._hook)
        return list(factors)

    def _delete(self, slot: str) -> None:
        """Forget ``slot``'s factors; a layer left with none loses its hook (called under the model lock)."""
        for module in self.model.modules():
            held = module.__dict__.get("slipway_lora")
            if held is None or slot not in held:
                continue
            del held[slot]
            if not held:
                del module.__dict__["slipway_lora"]
                handle = self._hooks.pop(id(module), None)
                if handle is not None:
                    handle.remove()

    def start_unload(self, name: str) -> None:
        """Refuse new requests for ``name`` (404) from now on. Raises 404 when it is not loaded."""
        if name not in self.loaded or name in self._draining:
            raise EngineError(404, f"no adapter named {name!r} is loaded", param="model")
        self._draining.add(name)

    def in_flight(self, name: str) -> int:
        return self._in_flight.get(name, 0)

    def cancel_unload(self, name: str) -> None:
        self._draining.discard(name)

    def finish_unload(self, name: str) -> None:
        """Delete a drained adapter's layers, between two steps of the batch."""
        with self._admin:
            slot = self._slot.pop(name)
            with self.model_lock:
                self._delete(slot)
            self.loaded.pop(name, None)
            self._in_flight.pop(name, None)
            self._draining.discard(name)

    # ------------------------------------------------------------------ requests

    def admit(self, name: str, request_id: str) -> None:
        """Bind a request to adapter ``name`` until :meth:`release`. 404 naming ``model`` when no adapter of that
        name is loaded (or it is being unloaded)."""
        if name not in self.loaded or name in self._draining:
            raise EngineError(404, f"no adapter named {name!r} is loaded on this replica", param="model")
        self._in_flight[name] += 1
        self._of_request[request_id] = self._slot[name]

    def release(self, name: str, request_id: str, *, finished: bool) -> None:
        """The request is over for its client. A finished request has left the manager; a cancelled one (call
        after ``cancel_request``) may still be in the step being prepared, so it keeps its rows and stays out of
        prefix sharing until a step is routed without it."""
        if request_id not in self._of_request:
            return
        if name in self._in_flight:
            self._in_flight[name] -= 1
        if finished:
            del self._of_request[request_id]
        else:
            self._leaving.add(request_id)

    def route(self, requests: list[Any]) -> None:
        """Set the rows of the coming step from its requests (transformers' FutureRequestState, in batch order).
        Called by the decode loop under the model lock, with :meth:`clear` after the step."""
        if not self._of_request:
            self._route = None
            return
        if self._leaving:  # cancelled before this step was scheduled: the manager has dropped them for good
            present = {future.state.request_id for future in requests}
            for rid in [r for r in list(self._leaving) if r not in present]:  # list(): added to by the event loop
                self._leaving.discard(rid)
                self._of_request.pop(rid, None)
        rows: dict[str, list[int]] = {}
        pos = 0
        for future in requests:
            n = future.query_length
            slot = self._of_request.get(future.state.request_id)
            if slot is not None:
                rows.setdefault(slot, []).extend(range(pos, pos + n))
            pos += n
        if not rows:
            self._route = None
            return
        groups: list[tuple[str, torch.Tensor | None]] = []
        for slot, idx in rows.items():
            if len(rows) == 1 and len(idx) == pos:
                groups.append((slot, None))  # every row: no mask
                continue
            mask = torch.zeros(pos, 1, dtype=self.model.dtype)
            mask[idx] = 1
            groups.append((slot, mask.to(self.model.device)))
        self._route = _Route(groups, pos)

    def clear(self) -> None:
        self._route = None

    def scoring_lock(self, name: str) -> _RoutedLock:
        """A stand-in for the model lock that also routes every row of the forward pass it guards to ``name`` (the
        scorer's passes of an adapter request's tokens)."""
        return _RoutedLock(self, name)

    def _hook(self, module: Any, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor | None:
        route = self._route
        if route is None:
            return None
        x = args[0]
        rows_x = x.reshape(-1, x.shape[-1])
        if route.tokens is not None and rows_x.shape[0] != route.tokens:
            raise RuntimeError(
                f"a LoRA layer saw {rows_x.shape[0]} rows in a step of {route.tokens} tokens: per-token adapters "
                "cannot be applied to this model"
            )
        out = output.reshape(-1, output.shape[-1])
        factors = module.__dict__.get("slipway_lora", {})
        for slot, mask in route.groups:
            ab = factors.get(slot)
            if ab is None:  # the adapter does not adapt this layer
                continue
            a, b = ab
            # every row through A (r columns: cheap), the rows of other requests zeroed, then B added in place:
            # three kernels per adapter in the step, where gathering and scattering the rows took four
            h = torch.mm(rows_x, a)
            if mask is not None:
                h.mul_(mask)
            out.addmm_(h, b)
        return out.view(output.shape)

    # ------------------------------------------------------------------ the manager's prefix cache

    def install(self, manager: Any) -> None:
        """Keep adapter requests out of ``manager``'s prefix sharing: their prompts are not matched against cached
        blocks, and their blocks are never offered to another request. Call before the manager starts."""
        create = manager._create_batch_processor

        def create_batch_processor() -> Any:
            bp = create()
            cache = bp.cache
            if not getattr(cache, "_slipway_adapters", False):
                search, mark = cache.search_prefix_match, cache.mark_complete_blocks

                def search_prefix_match(request_id: str, prompt_ids: list[int]) -> int:
                    return 0 if request_id in self._of_request else search(request_id, prompt_ids)

                def mark_complete_blocks(state: Any, complete_blocks: dict[str, int]) -> None:
                    if state.request_id not in self._of_request:
                        mark(state, complete_blocks)

                cache.search_prefix_match, cache.mark_complete_blocks = search_prefix_match, mark_complete_blocks
                cache._slipway_adapters = True
            return bp

        manager._create_batch_processor = create_batch_processor

    def stats(self) -> dict[str, Any]:
        return {name: info.as_dict(self._in_flight.get(name, 0)) for name, info in list(self.loaded.items())}


class _RoutedLock:
    def __init__(self, adapters: Adapters, name: str) -> None:
        self.adapters, self.name = adapters, name

    def __enter__(self) -> None:
        self.adapters.model_lock.acquire()
        slot = self.adapters._slot.get(self.name)
        self.adapters._route = None if slot is None else _Route([(slot, None)], None)

    def __exit__(self, *exc: object) -> None:
        self.adapters._route = None
        self.adapters.model_lock.release()


def _restore_base_layers(model: Any) -> None:
    """Put back every layer PEFT wrapped in ``model`` (its ``base_layer``), dropping PEFT's layers."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    wrapped = [name for name, m in model.named_modules() if isinstance(m, BaseTunerLayer)]
    for name in wrapped:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        layer = getattr(parent, child)
        if isinstance(layer, BaseTunerLayer):  # a wrapper inside another's base layer is gone with it
            setattr(parent, child, layer.get_base_layer())


def _check_config(name: str, config: Any) -> None:
    """400 for what per-token routing cannot apply."""
    refused = [
        ("use_dora", "DoRA"),
        ("lora_bias", "LoRA biases"),
        ("modules_to_save", "modules_to_save"),
        ("trainable_token_indices", "trainable tokens"),
    ]
    for attr, what in refused:
        if getattr(config, attr, None):
            raise EngineError(
                400, f"adapter {name!r} uses {what}, which cannot be applied per request in a shared batch", "model"
            )
