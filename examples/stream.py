"""Stream tokens as they are generated: one frozen Response per token.

python examples/stream.py [MODEL]        # default $EDGEMOE_MODEL, else the bundled model
"""

import os
import sys

import edgemoe

path = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("EDGEMOE_MODEL")

with edgemoe.load(path) as model:
    last = None
    for r in model.stream("KING HENRY. Once more unto the breach", max_tokens=48, temperature=0.8, seed=7, stop="\n\n"):
        print(r.text, end="", flush=True)  # may be "" while a UTF-8 sequence or a stop string is pending
        last = r
    print()
    s = last.stats
    print(
        f"finish_reason={last.finish_reason} tokens/s={last.tokens_per_s:.1f} "
        f"prompt_tokens={s.prompt_tokens} generated_tokens={s.generated_tokens} quality={s.quality} "
        f"lossless={s.lossless}"
    )
    if s.cache is not None:  # experts stream from a store (a memory budget was given)
        print(f"expert cache hit rate {s.cache.hit_rate:.1%}, {s.cache.bytes_read} bytes read")
