"""Base models: resolving a name, loading it once, and describing it (``ModelInfo``).

A base is loaded once per engine (so once per worker process) and shared by every run on it:
frozen weights, eval mode (no dropout), SDPA attention, on the engine's device and dtype.
Built-in tiny models are built into the model cache first and then loaded through the same
``from_pretrained`` path as a hub model or a local directory. Loading a model also writes its
tokenizer to ``catalog.tokenizer_dir`` so the web process can tokenize without torch.
"""

from __future__ import annotations

import inspect
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from eztinker_tasks import catalog, shapes
from eztinker_tasks.engine import hub, kernels, lockstep, sharding
from eztinker_tasks.engine.adapters import Targets, discover_targets, tensor_bytes, tied_unembedding
from eztinker_tasks.engine.multilora import LoraContext, inject
from eztinker_tasks.engine.tiny import ensure_tiny_model
from eztinker_tasks.errors import UnknownModel
from eztinker_tasks.types import ModelInfo

log = logging.getLogger(__name__)


@dataclass
class LoadedBase:
    """One loaded, frozen base model with the multi-adapter LoRA layers injected once.

    Every module LoRA can target (attention, MLP, unembedding: ``targets``) is a
    ``MultiLoraLinear``; which adapter serves which rows of a forward is ``context.route``
    (None: the bare base).
    """

    name: str  # as requested: built-in name, hub id or local path
    source: str  # what from_pretrained read: a local directory or a hub id
    model: nn.Module  # the frozen base, its target modules wrapped by MultiLoraLinear
    tokenizer: Any | None  # a transformers tokenizer, or None if the model ships none
    info: ModelInfo
    targets: Targets
    param_bytes: int
    cache_kwarg: str  # "cache" (transformers >= 5.2x) or "past_key_values"
    context: LoraContext
    tied_unembedding: bool = False  # lm_head shares its weight with the input embedding

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype


def _first_int(value: Any) -> int | None:
    if isinstance(value, (list, tuple)):
        value = value[0] if value else None
    return int(value) if isinstance(value, int) else None


def _max_context(config: Any) -> int:
    for key in ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return 2048


def _eos_id(config: Any, tokenizer: Any | None) -> int | None:
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        return int(tokenizer.eos_token_id)
    return _first_int(getattr(config, "eos_token_id", None))


class ModelRegistry:
    """Resolves model names and holds every loaded base of one engine."""

    def __init__(
        self,
        data_dir: Path,
        device: torch.device,
        dtype: torch.dtype,
        shared_dir: Path | None = None,
    ) -> None:
        self.data_dir = Path(data_dir)
        self.shared_dir = None if shared_dir is None else Path(shared_dir)
        self.device = device
        self.dtype = dtype
        self.bases: dict[str, LoadedBase] = {}
        self._infos: dict[str, ModelInfo] = {}

    def builtin_info(self, spec: catalog.BuiltinModel) -> ModelInfo:
        return ModelInfo(
            name=spec.name,
            architecture=spec.architecture,
            vocab_size=spec.vocab_size,
            max_context=spec.max_context,
            eos_token_id=spec.eos_token_id,
            builtin=True,
        )

    def list_models(self) -> list[ModelInfo]:
        infos = {name: self.builtin_info(spec) for name, spec in catalog.BUILTIN_MODELS.items()}
        infos.update(self._infos)
        infos.update({name: base.info for name, base in self.bases.items()})
        return list(infos.values())

    def model_info(self, name: str) -> ModelInfo:
        """Describe ``name`` from the catalog or its config (no weights are loaded)."""
        if name in self.bases:
            return self.bases[name].info
        spec = catalog.get_builtin(name)
        if spec is not None:
            catalog.ensure_tokenizer(name, self.data_dir)
            return self.builtin_info(spec)
        if name not in self._infos:
            source = self._source(name)
            shaped = shapes.check(name)
            if shaped is not None:
                config = AutoConfig.for_model(shaped.pop("model_type"), **shaped)
                tokenizer = None
            else:
                config = self._call(name, AutoConfig.from_pretrained, source)
                tokenizer = self._load_tokenizer(name, source)
            self._infos[name] = ModelInfo(
                name=name,
                architecture=str(getattr(config, "model_type", "unknown")),
                vocab_size=int(config.vocab_size),
                max_context=_max_context(config),
                eos_token_id=_eos_id(config, tokenizer),
                builtin=False,
            )
        return self._infos[name]

    def get(self, name: str) -> LoadedBase:
        """The loaded base ``name``, loading it on first use."""
        if name not in self.bases:
            self.bases[name] = self._load(name)
        return self.bases[name]

    def _source(self, name: str) -> str:
        if not isinstance(name, str) or not name:
            raise UnknownModel("base_model must be a non-empty string")
        if shapes.shape_of(name) is not None:
            try:
                shapes.check(name)
            except ValueError as exc:
                raise UnknownModel(str(exc), errors={"base_model": [name]}) from None
            return name
        spec = catalog.get_builtin(name)
        # Local directories are recorded absolute: checkpoints name their base by this path
        # (adapter_config.json's base_model_name_or_path), which must resolve anywhere.
        if spec is not None:
            return str(ensure_tiny_model(spec, self.data_dir).resolve())
        if Path(name).is_dir():
            return str(Path(name).resolve())
        if Path(name).is_absolute() or name.startswith("."):
            raise UnknownModel(f"model directory {name!r} does not exist")
        hub.ensure_fetchable(name, where="this worker")  # now, not after the client's retries
        return name  # a hub id

    @staticmethod
    def _call(name: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (OSError, ValueError) as exc:
            raise UnknownModel(
                f"could not load model {name!r}: {exc}", errors={"base_model": [str(name)]}
            ) from exc

    def _load_tokenizer(self, name: str, source: str) -> Any | None:
        """Load the tokenizer and mirror it into the torch-free tokenizer directory."""
        try:
            tokenizer = AutoTokenizer.from_pretrained(source)
        except Exception as exc:  # a model without a usable tokenizer still trains and samples
            log.warning(
                "model %s has no loadable tokenizer (%s); stop strings unavailable", name, exc
            )
            return None
        directory = catalog.tokenizer_dir(name, self.data_dir)
        if tokenizer is not None and not catalog.has_tokenizer(directory):
            with (
                catalog.file_lock(directory.parent / f".{directory.name}.lock"),
                catalog.atomic_directory(directory) as tmp,
            ):
                tokenizer.save_pretrained(tmp)
        if tokenizer is not None and self.shared_dir is not None:
            self._publish_tokenizer(name, directory)
        return tokenizer

    def _publish_tokenizer(self, name: str, directory: Path) -> None:
        """Copy this host's tokenizer files of ``name`` to the shared checkpoints dir, so a web
        or worker on another host can tokenize for the model (``catalog.find_tokenizer_dir``).
        A failed copy only costs the other hosts their text input; it is logged, not raised."""
        assert self.shared_dir is not None
        shared = catalog.shared_tokenizer_dir(name, self.shared_dir)
        if catalog.has_tokenizer(shared):
            return
        try:
            shared.parent.mkdir(parents=True, exist_ok=True)
            with catalog.file_lock(shared.parent / f".{shared.name}.lock"):
                if catalog.has_tokenizer(shared):  # another worker published it meanwhile
                    return
                with catalog.atomic_directory(shared) as tmp:
                    shutil.copytree(directory, tmp, dirs_exist_ok=True)
        except OSError as exc:
            log.warning("could not publish the tokenizer of %s to %s: %s", name, shared, exc)

    def _shaped(self, name: str) -> tuple[nn.Module, Any]:
        """A random-weight model of a real shape, built on the device (see ``shapes``)."""
        spec = shapes.check(name)
        assert spec is not None
        model_type = spec.pop("model_type")
        config = AutoConfig.for_model(model_type, **spec)
        config._attn_implementation = "sdpa"
        group = lockstep.group()
        if group is not None:  # never whole on one device: meta, sharded, then filled per shard
            model = sharding.build_shaped(
                lambda: AutoModelForCausalLM.from_config(config, dtype=self.dtype),
                group,
                self.dtype,
            )
        else:
            devices = [self.device.index or 0] if self.device.type == "cuda" else []
            with torch.random.fork_rng(devices=devices), torch.device(self.device):
                torch.manual_seed(0)
                model = AutoModelForCausalLM.from_config(config, dtype=self.dtype)
        directory = catalog.ensure_tokenizer(shapes.TOKENIZER, self.data_dir)
        return model, AutoTokenizer.from_pretrained(str(directory))

    def _load(self, name: str) -> LoadedBase:
        source = self._source(name)
        if shapes.shape_of(name) is not None:
            model, tokenizer = self._shaped(name)
            return self._wrap(name, source, model, tokenizer)
        offline = (
            {"local_files_only": True}
            if catalog.is_hub_id(source) and hub.local_only(source)
            else {}
        )
        model = self._call(
            name,
            AutoModelForCausalLM.from_pretrained,
            source,
            dtype=self.dtype,
            attn_implementation="sdpa",
            **offline,
        )
        assert isinstance(model, PreTrainedModel)
        return self._wrap(name, source, model, self._load_tokenizer(name, source))

    def _wrap(self, name: str, source: str, model: Any, tokenizer: Any | None) -> LoadedBase:
        """Freeze a loaded model on the device and inject its multi-adapter LoRA layers.

        On a multi-GPU worker the decoder layers are then sharded over the ranks
        (``sharding.shard``; a shaped base comes sharded already).
        """
        group = lockstep.group()
        if group is None or not sharding.is_sharded(model):
            model.to(self.device)
        model.requires_grad_(False)
        model.eval()
        kernels.fuse(model, self.device)
        spec = catalog.get_builtin(name)
        embeddings = model.get_input_embeddings()
        assert isinstance(embeddings, nn.Embedding)
        info = ModelInfo(
            name=name,
            architecture=spec.architecture if spec else str(model.config.model_type),
            vocab_size=int(embeddings.weight.shape[0]),
            max_context=_max_context(model.config),
            eos_token_id=_eos_id(model.config, tokenizer),
            builtin=spec is not None,
        )
        params = inspect.signature(model.forward).parameters
        tied = tied_unembedding(model) is not None
        targets = discover_targets(model)
        context = inject(model, targets.all)
        if group is not None and not sharding.is_sharded(model):
            sharding.shard(model, group)
        return LoadedBase(
            name=name,
            source=source,
            model=model,
            tokenizer=tokenizer,
            info=info,
            targets=targets,
            param_bytes=tensor_bytes(model.parameters()),
            cache_kwarg="cache" if "cache" in params else "past_key_values",
            context=context,
            tied_unembedding=tied,
        )
