"""The model catalog, tokenizer directories, tiny-model builds and the model registry."""

from __future__ import annotations

import importlib.util
import json
import random
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from engine_helpers import SENTENCE, TINY_MODELS, encode, new_run, sequence_datum, train
from safetensors.torch import load_file
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from eztinker_tasks import catalog
from eztinker_tasks.engine import Backend, Engine
from eztinker_tasks.engine.tiny import ensure_tiny_model
from eztinker_tasks.errors import UnknownModel
from eztinker_tasks.types import SampleSource

DATA = Path(catalog.__file__).parent / "data"


def test_catalog_is_torch_free() -> None:
    code = (
        "import sys, eztinker_tasks.catalog as c; "
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules; "
        "print(sorted(c.BUILTIN_MODELS))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == str(sorted(TINY_MODELS))


def test_tokenizer_dir_loads_with_tokenizers_and_transformers(data_dir: Path) -> None:
    for name in TINY_MODELS:
        directory = catalog.ensure_tokenizer(name, data_dir)
        assert directory == catalog.tokenizer_dir(name, data_dir)
        fast = Tokenizer.from_file(str(directory / "tokenizer.json"))
        auto = AutoTokenizer.from_pretrained(directory)
        assert auto is not None
        spec = catalog.BUILTIN_MODELS[name]
        assert fast.get_vocab_size() == spec.vocab_size
        assert fast.token_to_id(catalog.EOS_TOKEN) == spec.eos_token_id == auto.eos_token_id
        assert auto.pad_token_id == spec.eos_token_id
        assert fast.encode(SENTENCE).ids == auto(SENTENCE).input_ids
        assert auto.decode(auto(SENTENCE).input_ids) == SENTENCE


def test_tokenizer_is_built_once_even_when_raced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    builds = []
    real = catalog.write_tokenizer_files

    def counting(spec, directory):
        builds.append(spec.name)
        real(spec, directory)

    monkeypatch.setattr(catalog, "write_tokenizer_files", counting)
    threads = [
        threading.Thread(target=catalog.ensure_tokenizer, args=("tiny-gpt2", tmp_path))
        for _ in range(4)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    catalog.ensure_tokenizer("tiny-gpt2", tmp_path)
    assert builds == ["tiny-gpt2"]
    leftovers = [p.name for p in (tmp_path / "tokenizers").iterdir() if p.name.startswith(".tmp")]
    assert leftovers == []


def test_tokenizer_dir_for_unloaded_models(tmp_path: Path) -> None:
    with pytest.raises(UnknownModel):
        catalog.ensure_tokenizer("Qwen/Qwen2.5-0.5B", tmp_path)
    assert catalog.tokenizer_dir("Qwen/Qwen2.5-0.5B", tmp_path).name == "Qwen--Qwen2.5-0.5B"
    for odd in ("/abs/path/to/model", "../up", "a/b/c", "x" * 200):
        name = catalog.tokenizer_dir(odd, tmp_path).name
        assert "/" not in name and not name.startswith(".") and len(name) < 80
    assert catalog.tokenizer_dir("/a/m", tmp_path) != catalog.tokenizer_dir("/b/m", tmp_path)


def test_tiny_models_are_deterministic(data_dir: Path, tmp_path: Path) -> None:
    rebuilt = ensure_tiny_model(catalog.BUILTIN_MODELS["tiny-llama"], tmp_path)
    original = catalog.model_dir("tiny-llama", data_dir)
    a = load_file(str(original / "model.safetensors"))
    b = load_file(str(rebuilt / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    tok_a = (original / "tokenizer.json").read_text()
    assert tok_a == (rebuilt / "tokenizer.json").read_text()


def test_tiny_model_shapes(data_dir: Path) -> None:
    for name in TINY_MODELS:
        spec = catalog.BUILTIN_MODELS[name]
        model = AutoModelForCausalLM.from_pretrained(catalog.model_dir(name, data_dir))
        assert model.config.model_type == spec.architecture
        embeddings = model.get_input_embeddings()
        assert isinstance(embeddings, torch.nn.Embedding)
        assert embeddings.weight.shape == (spec.vocab_size, spec.hidden_size)
        params = sum(p.numel() for p in model.parameters())
        assert 1_000_000 < params < 10_000_000
    llama = AutoModelForCausalLM.from_pretrained(catalog.model_dir("tiny-llama", data_dir))
    assert llama.config.num_key_value_heads == 2
    embeddings = llama.get_input_embeddings()
    assert isinstance(embeddings, torch.nn.Embedding)
    assert llama.lm_head.weight.data_ptr() != embeddings.weight.data_ptr()


def test_registry(engine: Engine, data_dir: Path) -> None:
    infos = {m.name: m for m in engine.list_models()}
    assert set(TINY_MODELS) <= set(infos)
    for name in TINY_MODELS:
        info = engine.model_info(name)
        assert info == infos[name]
        assert (info.vocab_size, info.max_context, info.eos_token_id, info.builtin) == (
            2048,
            1024,
            0,
            True,
        )
        base = engine.models.get(name)
        assert base.info == info  # the loaded model agrees with the catalog
        assert isinstance(base.model, PreTrainedModel)
        embeddings = base.model.get_input_embeddings()
        assert isinstance(embeddings, torch.nn.Embedding)
        assert embeddings.weight.shape[0] == info.vocab_size
        assert engine.models.get(name) is base  # loaded once
        assert all(not p.requires_grad for p in base.model.parameters())
    assert engine.model_info("tiny-gpt2").architecture == "gpt2"
    assert engine.model_info("tiny-llama").architecture == "llama"
    with pytest.raises(UnknownModel):
        engine.model_info("no-such-org/no-such-model")


def test_local_directory_model(engine: Engine, data_dir: Path, tmp_path: Path) -> None:
    """A model given by path loads like a hub model and gets its tokenizer mirrored."""
    local = tmp_path / "my-model"
    shutil.copytree(catalog.model_dir("tiny-llama", data_dir), local)
    info = engine.model_info(str(local))
    assert (info.architecture, info.vocab_size, info.builtin) == ("llama", 2048, False)
    tok_dir = catalog.tokenizer_dir(str(local), data_dir)
    assert Tokenizer.from_file(str(tok_dir / "tokenizer.json")).get_vocab_size() == 2048
    assert catalog.ensure_tokenizer(str(local), data_dir) == tok_dir
    ids = encode(engine, "tiny-llama", SENTENCE)
    new_run(engine, "r", str(local))
    assert engine.run_info("r").base_model == str(local)
    losses = train(engine, "r", [sequence_datum(ids)], steps=3, lr=3e-3)
    assert losses[-1] < losses[0]
    same = engine.compute_logprobs(SampleSource(base_model=str(local)), ids)
    builtin = engine.compute_logprobs(SampleSource(base_model="tiny-llama"), ids)
    assert same == pytest.approx(builtin, abs=1e-6)
    assert {m.name for m in engine.list_models()} >= {str(local), *TINY_MODELS}


def _make_corpus_module():
    spec = importlib.util.spec_from_file_location("make_corpus", DATA / "make_corpus.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_shipped_corpus_and_chat_match_their_generator() -> None:
    module = _make_corpus_module()
    rng = random.Random(module.SEED)
    corpus = module.make_corpus(rng)
    chat = module.make_chat(rng)
    assert corpus == (DATA / "corpus.txt").read_text(encoding="utf-8")
    assert 100_000 <= len(corpus.encode()) <= 200_000
    lines = (DATA / "chat.jsonl").read_text(encoding="utf-8").splitlines()
    assert [json.loads(line) for line in lines] == chat
    assert len(chat) == 200
    assert all(set(pair) == {"prompt", "completion"} for pair in chat)
    assert {"prompt": "Reverse the word 'apple'.", "completion": " elppa"} in chat


def test_engine_implements_the_backend_protocol(engine: Engine) -> None:
    backend: Backend = engine  # checked statically by ty as well
    protocol_methods = {
        name
        for name in vars(Backend)
        if not name.startswith("_") and callable(getattr(Backend, name))
    }
    assert protocol_methods <= set(dir(backend))
    assert backend.device == "cpu" or backend.device.startswith("cuda")


def test_shaped_models_are_described_without_weights_and_unknown_shapes_refused(
    engine: Engine,
) -> None:
    from eztinker_tasks.errors import UnknownModel

    info = engine.model_info("shaped:llama-3.1-70b")  # no 140 GB anywhere: config only
    assert (info.architecture, info.vocab_size, info.max_context) == ("llama", 128256, 131072)
    with pytest.raises(UnknownModel, match="known: shaped:"):
        engine.model_info("shaped:no-such-shape")
