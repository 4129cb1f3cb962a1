"""Talk to `edgemoe serve` with the official OpenAI client (pip install openai).

edgemoe serve &                                   # http://127.0.0.1:8080/v1
python examples/openai_client.py [BASE_URL]       # default $EDGEMOE_BASE_URL, else http://127.0.0.1:8080/v1
"""

import os
import sys

from openai import OpenAI

base_url = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("EDGEMOE_BASE_URL", "http://127.0.0.1:8080/v1")
client = OpenAI(base_url=base_url, api_key="unused")  # the server does not check keys

model = client.models.list().data[0].id
print("model:", model)

done = client.completions.create(model=model, prompt="ROMEO. What light", max_tokens=24, temperature=0)
print("completion:", repr(done.choices[0].text), done.choices[0].finish_reason, done.usage)

chat = client.chat.completions.create(
    model=model,
    messages=[{"role": "user", "content": "Good morrow!"}],
    max_tokens=24,
    temperature=0.7,
    seed=1,
    extra_body={"top_k": 40, "min_p": 0.05, "repeat_penalty": 1.1},  # edgemoe's extensions
)
print("chat:", repr(chat.choices[0].message.content))

print("stream: ", end="")
for chunk in client.chat.completions.create(
    model=model, messages=[{"role": "user", "content": "Speak!"}], max_tokens=24, temperature=0, stream=True
):
    if chunk.choices and chunk.choices[0].delta.content:
        print(chunk.choices[0].delta.content, end="", flush=True)
print()
