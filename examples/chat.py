"""Chat: the model's chat template (base models: a plain User:/Assistant: transcript).

python examples/chat.py [MODEL]          # default $EDGEMOE_MODEL, else the bundled model
"""

import os
import sys

import edgemoe

path = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("EDGEMOE_MODEL")

with edgemoe.load(path) as model:
    messages = [
        {"role": "system", "content": "You speak like a Shakespearean character."},
        {"role": "user", "content": "Good morrow! How fares the king?"},
    ]
    reply = model.chat(messages, max_tokens=48, temperature=0.7, seed=3)
    print("assistant:", reply)

    messages += [{"role": "assistant", "content": reply}, {"role": "user", "content": "And the queen?"}]
    print("assistant: ", end="")
    for r in model.chat(messages, stream=True, max_tokens=48, temperature=0.7, seed=3):
        print(r.text, end="", flush=True)
    print()
