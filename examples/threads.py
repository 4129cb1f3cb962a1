"""One model, several threads: calls are serialised by the model's lock and give the same outputs
as the same calls made one after another.

    python examples/threads.py [MODEL]       # default $EDGEMOE_MODEL, else the bundled model
"""

import os
import sys
from concurrent.futures import ThreadPoolExecutor

import edgemoe

path = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("EDGEMOE_MODEL")
prompts = ["ROMEO.", "JULIET.", "HAMLET. To be", "MACBETH. Is this a dagger"]

with edgemoe.load(path) as model:

    def work(prompt: str) -> str:
        return model.generate(prompt, max_tokens=16, temperature=0.8, seed=42)  # seeded: reproducible

    serial = [work(p) for p in prompts]
    with ThreadPoolExecutor(max_workers=4) as pool:
        parallel = list(pool.map(work, prompts))
    for p, text in zip(prompts, parallel):
        print(f"{p!r} -> {text!r}")
    assert parallel == serial, "threads gave other outputs than serial calls"
    print("parallel outputs == serial outputs")
