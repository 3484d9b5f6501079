"""Text generators behind one interface: a local transformers model or an OpenAI-compatible endpoint.

    from tasks.generation import GeneratorConfig, DecodingParams, load_generator

    generator = load_generator(GeneratorConfig(backend="local", model="base"))
    completions = generator.complete(["Instruction: name three colors.\nOutput:"],
                                     DecodingParams(strategy="sample", max_new_tokens=32, stop=["\n"]))
    generator.close()

`server.py` serves any generator over the OpenAI wire format (tests, benchmarks, offline demos).
"""

from tasks.generation.config import GeneratorConfig, load_generator
from tasks.generation.params import Completion, DecodingParams, GenerationError, Generator

__all__ = ["Completion", "DecodingParams", "GenerationError", "Generator", "GeneratorConfig", "load_generator"]
