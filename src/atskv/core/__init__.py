"""The cache engine, at the bottom of the package: what a generation with a KV-cache method needs
and nothing else. Plain types and the registry, the method contract (:mod:`.method`), KV stores
(:mod:`.stores`), the native CPU decode kernels (:mod:`.kernels`), the one module that touches
transformers internals (:mod:`.seam`), the one that touches private PyTorch compiler APIs
(:mod:`.dynamo`) and the generation loop (:mod:`.engine`). Nothing here imports the layers above
it (methods, benchmarks, experiments, analysis, bench, integrations)."""
