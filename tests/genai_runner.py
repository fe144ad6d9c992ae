"""Greedy decoding with ONNX Runtime GenAI's own generator (the test extra installs it)."""

import numpy as np


def genai_greedy(path, prompt: list[int], new_tokens: int) -> list[int]:
    """Token ids GenAI's generator produces after ``prompt`` (it stops early at eos)."""
    import onnxruntime_genai as og

    model = og.Model(str(path))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + new_tokens, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(np.array([prompt], dtype=np.int32))
    tokens = []
    while not generator.is_done():
        generator.generate_next_token()
        tokens.append(int(generator.get_next_tokens()[0]))
    return tokens
