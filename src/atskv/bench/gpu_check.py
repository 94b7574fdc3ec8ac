"""``make gpu-check``: the checks that need a CUDA GPU, as one script of at most ~8 minutes for a
machine with a GPU and no network (SmolLM2 comes from the PyPI wheel, as everywhere).

1. the ``gpu``-marked tests (CUDA-graph replay equals eager decoding, a graph-captured batch of
   eight sequences decodes each as alone, CUDA peak memory);
2. ``make bench`` on CUDA (bf16) with every registered method at 4096
   and 8192 tokens, with the static decode step captured in a CUDA graph and without
   (``hardware.cuda_graph=false``), each against transformers' ``generate()``;
3. the same methods at 16K-64K tokens for speed only: SmolLM2 has 8192 positions, so the RoPE
   is extrapolated there (``model.max_position_embeddings`` raised) and accuracy is not claimed.

``--model <preset> --model-path <folder>`` runs the bench parts on another model preset (e.g.
``--model qwen3_8b --model-path /models/Qwen3-8B``, the weights already on the machine): part 3
then stays within the model's own positions (no extrapolation, accuracy not claimed either).

Writes ``outputs/gpu/``: ``tests.log``, ``bench.json`` (the three bench runs), ``bench.md`` and
each run's own folder. Exit status 0 only when every part passed.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from atskv.experiments import results

RUNS = [  # (name, context lengths, extra arguments, what it claims)
    ("graph", "4096,8192", [], "decode step captured in a CUDA graph"),
    ("eager", "4096,8192", ["hardware.cuda_graph=false"], "the same step, eager"),
    ("batch", "4096", ["--sections", "batch", "--batch-lens", "4096", "--batch-sizes", "1,8"],
     "sequences decoded together in one captured graph; throughput at a memory budget"),
    ("long", "16384,32768,65536", ["model.max_position_embeddings=131072", "--reps", "1"],
     "speed only: RoPE extrapolated past SmolLM2's 8192 positions, accuracy not claimed"),
]


def run(cmd: list[str], log: Path, timeout: int) -> int:
    t0 = time.perf_counter()
    with log.open("w") as f:
        try:
            rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            f.write(f"\nTIMED OUT after {timeout} s\n")
            rc = 124
    print(f"[gpu-check] {' '.join(cmd[2:5])} ... rc={rc} in {time.perf_counter() - t0:.0f} s",
          flush=True)
    return rc


def runs_for(model: str | None, model_path: str | None, new_tokens: int
             ) -> list[tuple[str, str, list[str], str]]:
    """:data:`RUNS` for a model preset (None: SmolLM2, the default): the preset and its folder
    as overrides, and the long run at the context lengths within its positions."""
    if model is None:
        return RUNS
    from omegaconf import OmegaConf

    preset = Path(__file__).resolve().parents[3] / "conf" / "model" / f"{model}.yaml"
    if not preset.is_file():
        names = sorted(f.stem for f in preset.parent.glob("*.yaml"))
        raise SystemExit(f"atskv.bench.gpu_check: error: --model {model!r}; choose one of "
                         f"{', '.join(names)}")
    positions = OmegaConf.load(preset).get("max_position_embeddings") or 0
    over = [f"model={model}", *([f"model.path={model_path}"] if model_path else [])]
    long = ",".join(str(n) for n in (16384, 32768, 65536) if n + new_tokens <= positions)
    runs = [(name, lens, [*over, *extra], claim) for name, lens, extra, claim in RUNS
            if name != "long"]
    if long:
        runs.append(("long", long, [*over, "--reps", "1"],
                     f"speed only, within {model}'s {positions} positions"))
    return runs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m atskv.bench.gpu_check", description=__doc__.split("\n")[0])
    p.add_argument("--out", default="outputs/gpu")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--model", default=None,
                   help="a conf/model preset to bench instead of SmolLM2 (e.g. qwen3_8b)")
    p.add_argument("--model-path", default=None,
                   help="the preset's weights: a local folder (or a hub id)")
    args = p.parse_args(argv)
    if args.model_path and not args.model:
        p.error("--model-path needs --model (the preset whose weights it holds)")
    runs = runs_for(args.model, args.model_path, args.new_tokens)
    import torch

    if not torch.cuda.is_available():
        print("atskv.bench.gpu_check: error: no CUDA device here; run it on a machine with a GPU",
              file=sys.stderr)
        return 2
    from atskv.methods import METHODS

    methods = ",".join(METHODS.names())  # every registered method
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    py = sys.executable
    rcs = {"tests": run([py, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider"],
                        out / "tests.log", 240)}
    merged: dict[str, object] = {"device": torch.cuda.get_device_name(0),
                                 "model": args.model or "smollm2_135m", "runs": {}}
    md = [f"# GPU check on {merged['device']} ({merged['model']})", ""]
    for name, lens, extra, claim in runs:
        folder = out / f"bench_{name}"
        cmd = [py, "-m", "atskv.bench", "--sections", "main", "--methods", methods,
               "--context-lens", lens, "--new-tokens", str(args.new_tokens), "--out", str(folder),
               "hardware=cuda", *extra]
        rcs[name] = run(cmd, out / f"bench_{name}.log", 150 if args.model is None else 600)
        bench = folder / "bench.json"
        if bench.is_file():
            merged["runs"][name] = {"claim": claim, **json.loads(bench.read_text())}  # type: ignore[index]
            md += [f"## {name}: {claim}", "", (folder / "bench.md").read_text(), ""]
    merged["exit_codes"] = rcs
    results.write_json(out / "bench.json", merged)
    results.atomic_write_text(out / "bench.md", "\n".join(md))
    print(f"[gpu-check] wrote {out}; exit codes {rcs}")
    return 0 if all(rc == 0 for rc in rcs.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
