"""A generator over a local transformers causal LM (a registry model or any HF folder).

    gen = LocalGenerator(Path("~/.alignflow/models/base/3").expanduser(), identity_name="base@3")
    gen.complete(["Instruction: name a fruit.\nOutput:"], DecodingParams(max_new_tokens=16, stop=["\n"]))

How it decodes:
- Prompts are sorted by token length, cut into batches of `batch_size` and LEFT-padded, so every row's
  last prompt token sits at the same position and generation appends to all rows at once; results
  come back in input order.
- greedy and beam search are transformers' own. Sampling is done with the Gumbel-max trick: the
  logits go through temperature, top-k and top-p, then each row adds Gumbel noise drawn from its
  OWN torch.Generator and the argmax is taken. That is an exact sample from the filtered softmax, and
  because each row's generator is seeded from (params.seed, the input text, its occurrence number),
  an input's sample does not depend on the other inputs of the call, their order, or the batch size
  (up to float rounding differences between padded and unpadded batches). The same inputs and
  params always give the same outputs on the same machine.
- Stop sequences: a StoppingCriteria decodes the tail of each row after every step and ends the row
  once a stop string appears; the text is then cut before the first stop string. (transformers'
  own `stop_strings` runs with our byte-level tokenizer, but it matches across the prompt boundary:
  with the prompt "Write" and stop "et", it stops after the first generated "te", because
  "Write"+"te" ends in "et". Ours looks at the generated text only.)
- presence_penalty is a LogitsProcessor that subtracts the penalty from tokens already generated
  (not those of the prompt); repetition_penalty is transformers' (prompt and output).
- complete() prepends the BOS when the tokenizer has one but does not add it itself (ours: the model
  was pretrained on BOS doc EOS); chat() renders the tokenizer's chat template, which writes it.
- End of sequence (any of the generation config's EOS ids) -> finish_reason "stop"; max_new_tokens reached -> "length". The returned text holds
  neither the prompt nor special tokens.
- A prompt longer than the model's context (max_position_embeddings - max_new_tokens) keeps its
  first token (BOS) and its last tokens; each such cut is logged and counted in `stats`.
- GPU in bf16 when there is one (device "auto"), otherwise CPU in fp32.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any, Sequence

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
    StoppingCriteria,
    StoppingCriteriaList,
)
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from tasks.generation.params import (
    Completion,
    DecodingParams,
    GenerationError,
    Generator,
    conversation_key,
    row_seeds,
    truncate_at_stop,
)

log = logging.getLogger(__name__)


class PresencePenaltyProcessor(LogitsProcessor):
    """Subtract `penalty` from the logit of every token that already occurs in the generated part."""

    def __init__(self, prompt_length: int, penalty: float):
        self.prompt_length = prompt_length
        self.penalty = penalty

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        generated = input_ids[:, self.prompt_length :]
        if generated.shape[1] == 0:
            return scores
        seen = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, generated, True)
        return scores - self.penalty * seen.to(scores.dtype)


class GumbelSampler(LogitsProcessor):
    """Turn greedy argmax into sampling: add Gumbel noise from one seeded generator per row.

    argmax(logits + Gumbel noise) is distributed as softmax(logits); tokens filtered out (-inf) stay
    out. Each row draws one noise vector per step from its own generator, so its draws do not
    depend on the other rows.
    """

    def __init__(self, seeds: Sequence[int]):
        self.seeds = list(seeds)
        self.generators: list[torch.Generator] | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.generators is None:
            self.generators = []
            for seed in self.seeds:
                g = torch.Generator(device=scores.device)
                g.manual_seed(seed)
                self.generators.append(g)
        vocab = scores.shape[-1]
        uniform = torch.stack(
            [torch.rand(vocab, generator=g, device=scores.device, dtype=torch.float32) for g in self.generators]
        )
        gumbel = -torch.log(-torch.log(uniform.clamp_(min=1e-20, max=1.0 - 1e-7)))
        return scores.float() + gumbel


class StopSequenceCriteria(StoppingCriteria):
    """Mark a row done once its decoded tail holds a stop string (only the generated part is checked)."""

    def __init__(self, tokenizer, stop: Sequence[str], prompt_length: int):
        self.tokenizer = tokenizer
        self.stop = list(stop)
        self.prompt_length = prompt_length
        # A new match ends in the newest token and every non-special token decodes to >= 1 byte, so
        # this many tokens cover any stop string; the margin absorbs specials and split characters.
        self.window = 2 * max(len(s.encode("utf-8")) for s in self.stop) + 8

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any) -> torch.BoolTensor:
        generated = input_ids[:, self.prompt_length :]
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        if generated.shape[1] == 0:
            return done
        tails = self.tokenizer.batch_decode(generated[:, -self.window :].tolist(), skip_special_tokens=True)
        for row, tail in enumerate(tails):
            if any(s in tail for s in self.stop):
                done[row] = True
        return done


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise GenerationError("device 'cuda' was asked for but torch sees no CUDA GPU; use device 'auto' or 'cpu'")
    return torch.device(device)


class LocalGenerator(Generator):
    """Batched generation with a transformers causal LM loaded from `model_dir`."""

    def __init__(self, model_dir: Path, identity_name: str, batch_size: int = 16, device: str = "auto"):
        model_dir = Path(model_dir)
        if not (model_dir / "config.json").is_file():
            raise GenerationError(f"{model_dir} is not a transformers model folder: it has no config.json")
        if batch_size < 1:
            raise GenerationError(f"batch_size must be >= 1, got {batch_size}")
        self.model_dir = model_dir
        self.identity_name = identity_name
        self.batch_size = batch_size
        self.device = pick_device(device)
        dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(self.device).eval()

        tok = self.tokenizer
        gen_eos = self.model.generation_config.eos_token_id
        eos = set(gen_eos if isinstance(gen_eos, list) else [gen_eos] if gen_eos is not None else [])
        if tok.eos_token_id is not None:
            eos.add(tok.eos_token_id)
        self.eos_ids = sorted(eos)
        pad = tok.pad_token_id if tok.pad_token_id is not None else self.model.generation_config.pad_token_id
        self.pad_id = pad if pad is not None else (self.eos_ids[0] if self.eos_ids else 0)
        # Our tokenizer adds no BOS by itself but the model was trained on BOS doc EOS: add it then.
        probe = tok("a", add_special_tokens=True)["input_ids"]
        self.add_bos = tok.bos_token_id is not None and (not probe or probe[0] != tok.bos_token_id)
        self.max_context = getattr(self.model.config, "max_position_embeddings", None)
        self._lock = threading.Lock()
        self._stats = dict(calls=0, inputs=0, batches=0, prompt_tokens=0, completion_tokens=0, truncated_prompts=0)
        self._closed = False

    # ---- the interface ---------------------------------------------------------------------------

    def identity(self) -> dict[str, Any]:
        return {"backend": "local", "model": self.identity_name}

    @property
    def stats(self) -> dict[str, Any]:
        return dict(self._stats)

    def complete(self, prompts: Sequence[str], params: DecodingParams) -> list[Completion]:
        prompts = list(prompts)
        for i, prompt in enumerate(prompts):
            if not isinstance(prompt, str):
                raise GenerationError(f"prompts[{i}] is {type(prompt).__name__}, expected str")
        encoded = self.tokenizer(prompts, add_special_tokens=True)["input_ids"] if prompts else []
        if self.add_bos:
            encoded = [[self.tokenizer.bos_token_id, *ids] for ids in encoded]
        return self._run(encoded, prompts, params)

    def chat(self, conversations: Sequence[list[dict]], params: DecodingParams) -> list[Completion]:
        if getattr(self.tokenizer, "chat_template", None) is None:
            raise GenerationError(f"the tokenizer in {self.model_dir} has no chat template; use complete()")
        texts = []
        for i, conversation in enumerate(conversations):
            if not isinstance(conversation, list) or not all(isinstance(m, dict) and "role" in m for m in conversation):
                raise GenerationError(f"conversations[{i}] must be a list of {{'role', 'content'}} dicts")
            texts.append(self.tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False))
        # The template writes the BOS itself.
        encoded = self.tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
        return self._run(encoded, [conversation_key(c) for c in conversations], params)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            del self.model
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    # ---- batching --------------------------------------------------------------------------------

    def _fit_context(self, ids: list[int], max_new_tokens: int) -> list[int]:
        if self.max_context is None or len(ids) + max_new_tokens <= self.max_context:
            return ids
        budget = self.max_context - max_new_tokens
        if budget < 2:
            raise GenerationError(
                f"max_new_tokens={max_new_tokens} leaves no room for a prompt in the model's context of "
                f"{self.max_context} tokens ({self.model_dir}); lower max_new_tokens"
            )
        self._stats["truncated_prompts"] += 1
        log.warning(
            "prompt of %d tokens + max_new_tokens %d exceeds the context of %d: keeping its first and last %d tokens",
            len(ids), max_new_tokens, self.max_context, budget - 1,
        )
        return [ids[0], *ids[-(budget - 1) :]]

    def _run(self, encoded: list[list[int]], keys: list[str], params: DecodingParams) -> list[Completion]:
        seeds = row_seeds(params.seed, keys)
        # An empty prompt without a BOS would be a row of padding only: start it with BOS or EOS.
        start_id = self.tokenizer.bos_token_id
        if start_id is None:
            start_id = self.eos_ids[0] if self.eos_ids else self.pad_id
        results: list[Completion | None] = [None] * len(encoded)
        with self._lock:  # one generate() at a time: the server calls in from many threads
            if self._closed:
                raise GenerationError("this LocalGenerator was closed")
            encoded = [self._fit_context(ids or [start_id], params.max_new_tokens) for ids in encoded]
            # Longest first: similar lengths share a batch, so little padding is computed.
            order = sorted(range(len(encoded)), key=lambda i: (-len(encoded[i]), i))
            self._stats["calls"] += 1
            self._stats["inputs"] += len(encoded)
            for start in range(0, len(order), self.batch_size):
                chunk = order[start : start + self.batch_size]
                outputs = self._generate_batch([encoded[i] for i in chunk], [seeds[i] for i in chunk], params)
                for i, completion in zip(chunk, outputs):
                    results[i] = completion
                self._stats["batches"] += 1
                self._stats["prompt_tokens"] += sum(c.prompt_tokens for c in outputs)
                self._stats["completion_tokens"] += sum(c.completion_tokens for c in outputs)
        return [c for c in results if c is not None]

    def _generate_batch(self, batch: list[list[int]], seeds: list[int], params: DecodingParams) -> list[Completion]:
        width = max(len(ids) for ids in batch)
        input_ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
        attention = torch.zeros((len(batch), width), dtype=torch.long)
        for row, ids in enumerate(batch):
            if ids:
                input_ids[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
                attention[row, width - len(ids) :] = 1
        input_ids, attention = input_ids.to(self.device), attention.to(self.device)

        config = GenerationConfig(
            max_new_tokens=params.max_new_tokens,
            do_sample=False,  # sampling is the GumbelSampler's job, seeded per row
            num_beams=params.num_beams if params.strategy == "beam" else 1,
            repetition_penalty=params.repetition_penalty,
            pad_token_id=self.pad_id,
            eos_token_id=self.eos_ids or None,
            bos_token_id=self.tokenizer.bos_token_id,
        )
        processors = LogitsProcessorList()
        if params.presence_penalty != 0.0:
            processors.append(PresencePenaltyProcessor(width, params.presence_penalty))
        if params.strategy == "sample" and not params.is_greedy:
            if params.temperature != 1.0:
                processors.append(TemperatureLogitsWarper(params.temperature))
            if params.top_k > 0:
                processors.append(TopKLogitsWarper(params.top_k))
            if params.top_p < 1.0:
                processors.append(TopPLogitsWarper(params.top_p))
            processors.append(GumbelSampler(seeds))
        stopping = StoppingCriteriaList()
        if params.stop:
            stopping.append(StopSequenceCriteria(self.tokenizer, params.stop, width))

        with torch.inference_mode():
            output = self.model.generate(
                input_ids=input_ids,
                attention_mask=attention,
                generation_config=config,
                logits_processor=processors,
                stopping_criteria=stopping,
            )
        generated = output[:, width:].tolist()
        return [self._finish(row, len(ids), params) for row, ids in zip(generated, batch)]

    def _finish(self, tokens: list[int], prompt_tokens: int, params: DecodingParams) -> Completion:
        eos_at = next((i for i, t in enumerate(tokens) if t in self.eos_ids), None)
        if eos_at is not None:
            body, count = tokens[:eos_at], eos_at + 1
        else:
            body, count = tokens, len(tokens)
        text = self.tokenizer.decode(body, skip_special_tokens=True)
        text, stopped = truncate_at_stop(text, params.stop)
        if stopped:
            if eos_at is None:
                # The row ended on the stop string; what follows is padding, not generated text.
                while count > 0 and body[count - 1] == self.pad_id:
                    count -= 1
            return Completion(text=text, finish_reason="stop", completion_tokens=count, prompt_tokens=prompt_tokens)
        reason = "stop" if eos_at is not None else "length"
        return Completion(text=text, finish_reason=reason, completion_tokens=count, prompt_tokens=prompt_tokens)
