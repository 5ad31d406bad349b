"""Peak RSS while `Engine.load` runs, against dense weights + expert-cache budget (prints JSON).

    python scripts/load_memory.py MODEL_DIR CAPACITY
The tokenizer stack is imported before the baseline is taken, so the delta is the model itself.
"""

from __future__ import annotations

import json
import resource
import sys
import threading
import time
from pathlib import Path

import psutil


def warm_up(path: Path) -> None:
    """Load a tiny model of the same architecture once, so imports and MLX's first-use allocations are
    in the baseline rather than counted as this model's memory."""
    import json
    import tempfile

    from moe_tui.inference import Engine
    from moe_tui.inference.synthetic import ARCHS, MORE_ARCHS, make_checkpoint

    model_type = json.loads((path / "config.json").read_text()).get("model_type")
    if model_type in ARCHS or model_type in MORE_ARCHS:
        with tempfile.TemporaryDirectory() as tmp:
            tiny = Engine.load(make_checkpoint(Path(tmp) / "tiny", model_type), capacity=1.0)
            tiny.stream([1, 2, 3], max_tokens=1).__next__()
            tiny.close()


def main() -> int:
    path, capacity = sys.argv[1], float(sys.argv[2])
    from mlx_lm.utils import load_tokenizer
    from moe_tui.inference import Engine

    load_tokenizer(Path(path))  # import transformers & co. before the baseline
    warm_up(Path(path))
    proc = psutil.Process()
    baseline = proc.memory_info().rss
    peak = baseline
    done = threading.Event()

    def sample():
        nonlocal peak
        while not done.is_set():
            peak = max(peak, proc.memory_info().rss)
            time.sleep(0.002)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    engine = Engine.load(path, capacity=capacity if capacity <= 1 else int(capacity))
    peak_load = peak
    engine.warm()  # fill every slot: the cache budget is then really in use
    done.set()
    sampler.join()
    peak = max(peak, proc.memory_info().rss)
    print(json.dumps({
        "baseline_rss": baseline, "peak_rss_delta": peak - baseline, "load_peak_rss_delta": peak_load - baseline,
        "ru_maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
        "dense_bytes": engine.layout.dense_bytes, "cache_bytes": engine.cache_bytes(),
        "all_experts_bytes": engine.layout.all_experts_bytes,
    }))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
