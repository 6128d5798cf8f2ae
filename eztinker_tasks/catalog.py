"""The built-in model table and the tokenizer directories, torch-free.

The web process imports this module to list models and to tokenize without torch, so it may
only use the standard library and the ``tokenizers`` package. It owns:

- ``BUILTIN_MODELS``: the tiny offline models (name -> architecture, shape, vocab, context, EOS);
- ``tokenizer_dir(name, data_dir)``: where the tokenizer files of any model live
  (``data_dir/tokenizers/<safe name>/``; for hub or local models the engine writes them there
  when it loads the model, and publishes a copy under the checkpoints dir, which every host
  shares: ``shared_tokenizer_dir``; ``find_tokenizer_dir`` looks in both);
- ``ensure_tokenizer(name, data_dir)``: builds a built-in model's byte-level BPE tokenizer once
  (trained on the shipped corpus, written to a temp dir and renamed into place under a file
  lock) so that both ``tokenizers.Tokenizer.from_file(dir / "tokenizer.json")`` and
  ``transformers.AutoTokenizer.from_pretrained(dir)`` load it;
- ``file_lock`` and ``atomic_directory``, the two helpers every on-disk cache here uses.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import uuid
from collections.abc import Generator
from dataclasses import dataclass
from pathlib import Path

from eztinker_tasks import shapes
from eztinker_tasks.errors import UnknownModel

EOS_TOKEN = "<|endoftext|>"
CORPUS_PATH = Path(__file__).resolve().parent / "data" / "corpus.txt"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
# The built-in models' chat template (Jinja, as transformers' ``apply_chat_template`` and the
# OpenAI-compatible chat route render it): a role header per message, each turn ended by EOS.
BUILTIN_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


@dataclass(frozen=True)
class BuiltinModel:
    """A tiny model built offline from this description (random weights from ``seed``)."""

    name: str
    architecture: str  # the transformers ``model_type``: "gpt2" or "llama"
    vocab_size: int
    max_context: int
    eos_token_id: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    seed: int
    description: str


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    m.name: m
    for m in (
        BuiltinModel(
            name="tiny-gpt2",
            architecture="gpt2",
            vocab_size=2048,
            max_context=1024,
            eos_token_id=0,
            hidden_size=192,
            num_layers=4,
            num_heads=4,
            num_kv_heads=4,
            intermediate_size=768,
            seed=0,
            description="GPT-2 architecture (Conv1D layers, tied unembedding), random weights",
        ),
        BuiltinModel(
            name="tiny-llama",
            architecture="llama",
            vocab_size=2048,
            max_context=1024,
            eos_token_id=0,
            hidden_size=192,
            num_layers=4,
            num_heads=4,
            num_kv_heads=2,
            intermediate_size=512,
            seed=1,
            description="Llama architecture (GQA, gated MLP, untied lm_head), random weights",
        ),
    )
}


def get_builtin(name: str) -> BuiltinModel | None:
    return BUILTIN_MODELS.get(name)


_HUB_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*(/[A-Za-z0-9][A-Za-z0-9_.\-]*)?$")


def is_hub_id(name: str) -> bool:
    """Whether ``name`` has the shape of a Hugging Face model id (``gpt2``, ``org/model``)."""
    return bool(_HUB_NAME_RE.match(name)) and ".." not in name


def safe_dir_name(name: str) -> str:
    """A single, safe path component for a model name (hub id, built-in name or local path)."""
    if is_hub_id(name) and len(name) <= 96:
        return name.replace("/", "--")
    stem = re.sub(r"[^A-Za-z0-9_.\-]+", "-", Path(name).name).strip(".-")[:48] or "model"
    digest = hashlib.sha256(name.encode()).hexdigest()[:12]
    return f"{stem}-{digest}"


def model_dir(name: str, data_dir: Path) -> Path:
    """Where a built-in model's weights, config and tokenizer are cached."""
    return Path(data_dir) / "models" / safe_dir_name(name)


def tokenizer_model(name: str) -> str:
    """The model whose tokenizer ``name`` uses: itself, or for a random-weight ``shaped:``
    model the built-in one it is made with (``shapes.TOKENIZER``)."""
    return shapes.TOKENIZER if shapes.shape_of(name) is not None else name


def tokenizer_dir(name: str, data_dir: Path) -> Path:
    """Where the tokenizer files of model ``name`` live (they may not exist yet)."""
    return Path(data_dir) / "tokenizers" / safe_dir_name(tokenizer_model(name))


def has_tokenizer(directory: Path) -> bool:
    return (directory / "tokenizer_config.json").is_file()


SHARED_TOKENIZERS = ".tokenizers"


def shared_tokenizer_dir(name: str, checkpoints_dir: Path) -> Path:
    """Where a worker publishes the tokenizer files of a hub or local model for every host:
    ``checkpoints_dir/.tokenizers/<safe name>/``. The checkpoints dir is the one directory the
    hosts of a multi-host service share; the dot keeps it out of checkpoint listings."""
    return Path(checkpoints_dir) / SHARED_TOKENIZERS / safe_dir_name(tokenizer_model(name))


def find_tokenizer_dir(name: str, data_dir: Path, checkpoints_dir: Path | None = None) -> Path:
    """This host's tokenizer directory of ``name`` if it holds the files, else the shared one
    if that does (a worker on another host loaded the model), else this host's (empty)."""
    local = tokenizer_dir(name, data_dir)
    if checkpoints_dir is not None and not has_tokenizer(local):
        shared = shared_tokenizer_dir(name, checkpoints_dir)
        if has_tokenizer(shared):
            return shared
    return local


@contextlib.contextmanager
def file_lock(path: Path) -> Generator[None, None, None]:
    """An exclusive advisory lock (``flock``) held while the block runs; blocks until free."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextlib.contextmanager
def atomic_directory(final: Path) -> Generator[Path, None, None]:
    """Yield a fresh temp dir beside ``final``; rename it to ``final`` if the block succeeds.

    The caller holds a lock and has checked that ``final`` does not exist. On error the temp
    dir is removed, so a crash never leaves a half-written ``final``.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".tmp-{final.name}-{uuid.uuid4().hex[:12]}"
    tmp.mkdir()
    try:
        yield tmp
        for child in tmp.iterdir():
            if child.is_file():
                with open(child, "rb") as f:
                    os.fsync(f.fileno())
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fd = os.open(final.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def ensure_tokenizer(name: str, data_dir: Path) -> Path:
    """The tokenizer directory of ``name``, building it first for a built-in model.

    For other models the directory exists once a worker has loaded the model; until then this
    raises ``UnknownModel``.
    """
    directory = tokenizer_dir(name, data_dir)
    if has_tokenizer(directory):
        return directory
    spec = get_builtin(name)
    if spec is None:
        raise UnknownModel(
            f"no tokenizer for model {name!r} yet: it is written when a worker loads the model",
            errors={"base_model": [f"unknown: {name}"]},
        )
    with file_lock(directory.parent / f".{directory.name}.lock"):
        if not has_tokenizer(directory):
            with atomic_directory(directory) as tmp:
                write_tokenizer_files(spec, tmp)
    return directory


def train_tokenizer(vocab_size: int, corpus: Path = CORPUS_PATH):
    """Train a GPT-2 style byte-level BPE on ``corpus`` (deterministic); EOS gets id 0."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    text = corpus.read_text(encoding="utf-8")
    paragraphs = [p for p in text.split("\n\n") if p.strip()]
    tokenizer.train_from_iterator(paragraphs, trainer=trainer)
    return tokenizer


def write_tokenizer_files(spec: BuiltinModel, directory: Path) -> None:
    """Write tokenizer.json plus the JSON files transformers' AutoTokenizer reads."""
    tokenizer = train_tokenizer(spec.vocab_size)
    eos_id = tokenizer.token_to_id(EOS_TOKEN)
    if eos_id != spec.eos_token_id:
        raise RuntimeError(f"EOS token got id {eos_id}, expected {spec.eos_token_id}")
    tokenizer.save(str(directory / "tokenizer.json"))
    special = {"bos_token": EOS_TOKEN, "eos_token": EOS_TOKEN, "unk_token": EOS_TOKEN}
    special["pad_token"] = EOS_TOKEN
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": spec.max_context,
        "clean_up_tokenization_spaces": False,
        "add_prefix_space": False,
        "chat_template": BUILTIN_CHAT_TEMPLATE,
        **special,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (directory / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
