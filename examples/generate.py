"""Generate text with the embedding API.

python examples/generate.py [MODEL]      # MODEL: a GGUF file or expert store; default $EDGEMOE_MODEL,
                                         # else the bundled model
"""

import os
import sys

import edgemoe

path = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("EDGEMOE_MODEL")

with edgemoe.load(path) as model:  # closing the model frees its memory
    print(model)
    text = model.generate("ROMEO. What light through yonder window", max_tokens=48, temperature=0.7, seed=1)
    print(text)
    greedy = model.generate("JULIET. O Romeo, Romeo!", max_tokens=24, temperature=0)  # temperature 0: greedy
    print(greedy)
    s = model.stats()
    print(
        f"{s.generated_tokens} tokens generated, {s.decode_tokens_per_s:.1f} tokens/s, "
        f"{s.resident_bytes / 2**20:.0f} MiB resident, quality {s.quality} "
        f"({'lossless' if s.lossless else 'lossy'})"
    )
