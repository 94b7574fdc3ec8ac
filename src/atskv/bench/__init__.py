"""``make bench``: the performance protocol (:mod:`.main`), its paired per-step section
(:mod:`.paired`), its shared-prefill sweep section (:mod:`.sweep`) and ``make gpu-check``
(:mod:`.gpu_check`)."""
