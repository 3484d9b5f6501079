"""Evaluation of the align stage on held-out prompts: base vs SFT vs PPO, side by side.

    result = evaluate_models({"base": base_dir, "sft": sft_dir, "ppo": ppo_dir}, rm_dir,
                             prompts, references, DecodingParams(strategy="sample", temperature=0.7))
    write_eval_tables(result, folder)   # metrics.parquet + samples.parquet

Per model it measures:
- the mean RM reward of its answers (with standard error), read at the EOS that ends the answer,
  exactly as PPO reads it (the answer is scored as token ids, not re-tokenized text);
- KL from the reference model (default "sft"), estimated on the model's own samples:
  the sum over answer tokens of log p_model - log p_reference, averaged over prompts. With sampling,
  both log-probs are taken at the sampling temperature (the distribution the samples come from, as in
  PPO's KL; top-k/top-p truncation is ignored); with greedy or beam search at temperature 1, where
  the number is a log-likelihood ratio on those answers rather than an unbiased KL;
- answer length in tokens (before EOS) and how often the answer ran out of tokens without EOS;
- win rate against the reference model, by the RM and, when a judge is given, by an LLM judge asked
  twice with the positions swapped (inconsistent verdicts count as ties);
- perplexity on held-out instruction data (prompt + reference answer; answer tokens and EOS only).
A samples table shows the same prompts answered by every model.

Every model must share the reward model's tokenizer (answers pass between them as token ids).
Tests: `pytest tests/tasks/align/test_evaluate.py`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from storage.errors import AlignflowError
from tasks.align.stats import mean_se, paired_difference
from tasks.generation.params import DecodingParams

Judge = Callable[[str, str, str], str]  # judge(prompt, answer_a, answer_b) -> "A" | "B" | "tie"
VERDICTS = ("A", "B", "tie")


class EvaluationError(AlignflowError, ValueError):
    """Bad input to the evaluation (models, prompts, references, decoding, judge answers)."""


def _pad_right(rows: Sequence[Sequence[int]], pad_id: int, device):
    import torch

    width = max(len(row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(list(row), dtype=torch.long)
        mask[i, : len(row)] = 1
    return ids.to(device), mask.to(device)


def _pad_left(rows: Sequence[Sequence[int]], pad_id: int, device):
    import torch

    width = max(len(row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = torch.tensor(list(row), dtype=torch.long)
        mask[i, width - len(row) :] = 1
    return ids.to(device), mask.to(device)


def _batches(n: int, size: int):
    for start in range(0, n, size):
        yield range(start, min(start + size, n))


def generate_answers(model, tokenizer, queries: list[list[int]], decoding: DecodingParams, batch_size: int):
    """Answer every query; returns (answer ids before EOS, whether EOS ended it) per query.

    An answer ends at its first EOS (or pad, where PPO also ends it); the ids exclude that token.
    """
    import torch
    from transformers import GenerationConfig

    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    settings: dict[str, Any] = dict(
        max_new_tokens=decoding.max_new_tokens,
        eos_token_id=eos,
        pad_token_id=pad,
        repetition_penalty=decoding.repetition_penalty,
    )
    if decoding.strategy == "beam":
        settings.update(do_sample=False, num_beams=decoding.num_beams)
    elif decoding.is_greedy:
        settings.update(do_sample=False)
    else:
        settings.update(do_sample=True, temperature=decoding.temperature, top_k=decoding.top_k, top_p=decoding.top_p)
    config = GenerationConfig(**settings)
    device = next(model.parameters()).device
    torch.manual_seed(decoding.seed)  # the same seed for every model: comparable draws
    answers: list[tuple[list[int], bool]] = []
    with torch.no_grad():
        for rows in _batches(len(queries), batch_size):
            ids, mask = _pad_left([queries[i] for i in rows], pad, device)
            out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
            for generated in out[:, ids.shape[1] :].tolist():
                ends = [k for k, token in enumerate(generated) if token in (eos, pad)]
                cut = ends[0] if ends else len(generated)
                answers.append((generated[:cut], bool(ends) and generated[cut] == eos))
    return answers


def token_logprobs(model, pad_id: int, pairs: list[tuple[list[int], list[int]]], temperature: float, batch_size: int):
    """Log-probs of each target token given its prefix (and the target tokens before it); one array per pair."""
    import torch

    device = next(model.parameters()).device
    out: list[np.ndarray] = []
    with torch.no_grad():
        for rows in _batches(len(pairs), batch_size):
            seqs = [pairs[i][0] + pairs[i][1] for i in rows]
            ids, mask = _pad_right(seqs, pad_id, device)
            logits = model(input_ids=ids, attention_mask=mask).logits.float() / temperature
            logp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
            for row, i in enumerate(rows):
                prefix, target = pairs[i]
                start = len(prefix) - 1  # logits at position p predict token p + 1
                out.append(logp[row, start : start + len(target)].cpu().numpy().astype(np.float64))
    return out


def reward_scores(reward_model, pad_id: int, sequences: list[list[int]], batch_size: int) -> list[float]:
    """RM score of each full sequence (query + answer + EOS), read at its last token."""
    import torch

    device = next(reward_model.parameters()).device
    scores: list[float] = []
    with torch.no_grad():
        for rows in _batches(len(sequences), batch_size):
            ids, mask = _pad_right([sequences[i] for i in rows], pad_id, device)
            scores.extend(reward_model(input_ids=ids, attention_mask=mask).logits[:, 0].float().cpu().tolist())
    return scores


def _win_counts(ours: Sequence[float], theirs: Sequence[float], tol: float = 1e-6) -> dict[str, Any]:
    wins = sum(a > b + tol for a, b in zip(ours, theirs))
    losses = sum(b > a + tol for a, b in zip(ours, theirs))
    ties = len(ours) - wins - losses
    return {"wins": wins, "losses": losses, "ties": ties, "win_rate": (wins + 0.5 * ties) / max(len(ours), 1)}


def judge_win_rate(judge: Judge, prompts: list[str], ours: list[str], theirs: list[str]) -> dict[str, Any]:
    """Ask `judge` twice per prompt with the answers' positions swapped; only agreeing verdicts count."""
    wins = losses = ties = inconsistent = 0
    for i, (prompt, a, b) in enumerate(zip(prompts, ours, theirs)):
        first, second = judge(prompt, a, b), judge(prompt, b, a)
        for verdict in (first, second):
            if verdict not in VERDICTS:
                raise EvaluationError(f"prompt {i}: the judge answered {verdict!r}; expected one of {VERDICTS}")
        if first == "A" and second == "B":
            wins += 1
        elif first == "B" and second == "A":
            losses += 1
        else:
            ties += 1
            # Agreeing ties are (tie, tie); anything else here (A then A, A then tie, ...) changed
            # its mind when the answers swapped places.
            inconsistent += (first, second) != ("tie", "tie")
    n = max(len(prompts), 1)
    return {
        "wins": wins,
        "losses": losses,
        "ties": ties,
        "inconsistent": inconsistent,
        "win_rate": (wins + 0.5 * ties) / n,
    }


def _check_inputs(models, reward_dir, prompts, references, decoding, reference_model) -> None:
    if not models:
        raise EvaluationError("no models to evaluate")
    if reference_model not in models:
        raise EvaluationError(f"reference_model {reference_model!r} is not among the models ({', '.join(models)})")
    for name, folder in {**models, "reward model": reward_dir}.items():
        if not (Path(folder) / "config.json").is_file():
            raise EvaluationError(f"{folder}: no model folder for {name!r} here (config.json missing)")
    if not prompts:
        raise EvaluationError("no prompts to evaluate on")
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, str) or not prompt.strip():
            raise EvaluationError(f"prompts[{i}] is {prompt!r}; every prompt must be non-empty text")
    if references is not None and len(references) != len(prompts):
        raise EvaluationError(f"{len(references)} references for {len(prompts)} prompts; give one per prompt")
    if decoding.presence_penalty != 0.0 or decoding.stop:
        raise EvaluationError(
            "decoding.presence_penalty and decoding.stop are not supported here: answers end at EOS and are "
            "scored as the policy's tokens"
        )


def _same_tokenizer(tokenizer, reference, name: str, folder: Path) -> None:
    same = (
        tokenizer.get_vocab() == reference.get_vocab()
        and tokenizer.eos_token_id == reference.eos_token_id
        and tokenizer.pad_token_id == reference.pad_token_id
    )
    if not same:
        raise EvaluationError(
            f"{folder}: model {name!r} has another tokenizer than the reward model; answers pass between "
            "models as token ids, so every model must share the RM's tokenizer"
        )


def _answer_all(models: dict[str, Path], tokenizer, queries: list[list[int]], reference_targets, decoding: DecodingParams,
                reference_model: str, kl_temperature: float, batch_size: int, dtype, device, log):
    """Every model answers every query; log-probs of the answers under themselves and the reference.

    The reference model goes last: it scores every other model's answers while it is loaded.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    answers: dict[str, list[tuple[list[int], bool]]] = {}
    own: dict[str, list[np.ndarray]] = {}
    under_reference: dict[str, list[np.ndarray]] = {}
    perplexity: dict[str, float | None] = {}

    def targets(name: str) -> list[tuple[list[int], list[int]]]:
        return [(q, ids + ([eos] if ended else [])) for q, (ids, ended) in zip(queries, answers[name])]

    for name in [n for n in models if n != reference_model] + [reference_model]:
        _same_tokenizer(AutoTokenizer.from_pretrained(models[name]), tokenizer, name, models[name])
        model = AutoModelForCausalLM.from_pretrained(models[name], dtype=dtype).to(device).eval()
        answers[name] = generate_answers(model, tokenizer, queries, decoding, batch_size)
        own[name] = token_logprobs(model, pad, targets(name), kl_temperature, batch_size)
        if name == reference_model:
            for other in models:
                if other != reference_model:
                    under_reference[other] = token_logprobs(model, pad, targets(other), kl_temperature, batch_size)
        perplexity[name] = None
        if reference_targets is not None:
            nll = token_logprobs(model, pad, list(zip(queries, reference_targets)), 1.0, batch_size)
            perplexity[name] = float(math.exp(-sum(x.sum() for x in nll) / sum(x.size for x in nll)))
        log(f"eval: {name} answered {len(queries)} prompts")
        del model
    return answers, own, under_reference, perplexity, targets


def _model_row(name: str, rewards, answers, rouge, perplexity, kls, reference_model: str, judge_result) -> dict[str, Any]:
    """The metrics of one model; differences to the reference model are paired per prompt."""
    reward_mean, reward_se = mean_se(rewards[name])
    length_mean, length_se = mean_se([len(ids) for ids, _ in answers[name]])
    row: dict[str, Any] = {
        "reward_mean": reward_mean, "reward_se": reward_se,
        "response_length_mean": length_mean, "response_length_se": length_se,
        "missing_eos_rate": float(np.mean([not ended for _, ended in answers[name]])),
        "rouge_l_mean": mean_se(rouge[name])[0] if rouge else None,
        "rouge_l_se": mean_se(rouge[name])[1] if rouge else None,
        "perplexity": perplexity[name],
        "kl_from_reference": None, "kl_se": None, "reward_gain": None, "reward_gain_se": None,
        "rouge_l_gain": None, "rouge_l_gain_se": None,
        "win_rate_rm": None, "win_rate_llm": None, "rm_comparison": None, "llm_comparison": None,
    }
    if name == reference_model:
        return row
    row["kl_from_reference"], row["kl_se"] = mean_se(kls)
    row["reward_gain"], row["reward_gain_se"] = paired_difference(rewards[name], rewards[reference_model])
    if rouge:
        row["rouge_l_gain"], row["rouge_l_gain_se"] = paired_difference(rouge[name], rouge[reference_model])
    row["rm_comparison"] = _win_counts(rewards[name], rewards[reference_model])
    row["win_rate_rm"] = row["rm_comparison"]["win_rate"]
    if judge_result is not None:
        row["llm_comparison"] = judge_result
        row["win_rate_llm"] = judge_result["win_rate"]
    return row


def evaluate_models(
    models: dict[str, Path],
    reward_dir: Path,
    prompts: list[str],
    references: list[str] | None = None,
    decoding: DecodingParams | None = None,
    reference_model: str = "sft",
    judge: Judge | None = None,
    batch_size: int = 32,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Compare `models` (name -> HF folder) on held-out `prompts`; see the module docstring for the metrics.

    Returns plain JSON-able data: `models` (metrics per model), `samples` (one row per prompt with each
    model's answer and reward), `num_prompts`, `reference_model`, `decoding`.
    """
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from tasks.align.devices import torch_device
    from tasks.align.ppo import chat_full_ids, chat_query_ids, check_reward_reading, check_tokenizer
    from tasks.align.preferences import rouge_l

    decoding = decoding or DecodingParams(strategy="sample", temperature=0.7, max_new_tokens=40)
    models = {name: Path(folder) for name, folder in models.items()}
    _check_inputs(models, Path(reward_dir), prompts, references, decoding, reference_model)
    device = torch_device()
    dtype = torch.bfloat16 if device == "cuda" else torch.float32

    tokenizer = AutoTokenizer.from_pretrained(reward_dir)
    check_tokenizer(tokenizer, Path(reward_dir))
    queries = [chat_query_ids(tokenizer, p) for p in prompts]
    reference_targets = None
    if references is not None:
        # The answer and its EOS, as the chat template renders it after the query.
        reference_targets = [chat_full_ids(tokenizer, p, a)[len(q):] for q, p, a in zip(queries, prompts, references)]
    kl_temperature = 1.0 if decoding.is_greedy or decoding.strategy == "beam" else decoding.temperature
    answers, own, under_reference, perplexity, targets = _answer_all(
        models, tokenizer, queries, reference_targets, decoding, reference_model, kl_temperature, batch_size, dtype, device, log)

    reward_model = AutoModelForSequenceClassification.from_pretrained(reward_dir, num_labels=1, dtype=dtype).to(device).eval()
    if reward_model.config.pad_token_id is None:
        reward_model.config.pad_token_id = tokenizer.pad_token_id
    check_reward_reading(reward_model, tokenizer, prompts[0])
    rewards = {name: reward_scores(reward_model, tokenizer.pad_token_id, [q + t for q, t in targets(name)], batch_size)
               for name in models}
    del reward_model

    texts = {name: [tokenizer.decode(ids, skip_special_tokens=True) for ids, _ in answers[name]] for name in models}
    rouge = {name: [rouge_l(r, t) for r, t in zip(references, texts[name])] for name in models} if references else {}
    metrics: dict[str, dict[str, Any]] = {}
    for name in models:
        kls = [float((a - b).sum()) for a, b in zip(own[name], under_reference.get(name, []))]
        judged = None
        if judge is not None and name != reference_model:
            judged = judge_win_rate(judge, prompts, texts[name], texts[reference_model])
        row = metrics[name] = _model_row(name, rewards, answers, rouge, perplexity, kls, reference_model, judged)
        log(
            f"eval: {name}: reward {row['reward_mean']:.3f} ± {row['reward_se']:.3f}, length {row['response_length_mean']:.1f}"
            + (f", ROUGE-L to reference {row['rouge_l_mean']:.3f}" if row["rouge_l_mean"] is not None else "")
            + (f", reward gain over {reference_model} {row['reward_gain']:+.3f} ± {row['reward_gain_se']:.3f}, KL "
               f"{row['kl_from_reference']:.3f}, RM win rate {row['win_rate_rm']:.2f}" if row["reward_gain"] is not None else "")
            + (f", perplexity {row['perplexity']:.2f}" if row["perplexity"] is not None else "")
        )

    samples = []
    for i, prompt in enumerate(prompts):
        sample: dict[str, Any] = {"prompt": prompt}
        if references is not None:
            sample["reference"] = references[i]
        for name in models:
            sample[name] = texts[name][i]
            sample[f"{name}_reward"] = rewards[name][i]
        samples.append(sample)
    return {"num_prompts": len(prompts), "reference_model": reference_model, "decoding": decoding.model_dump(mode="json"),
            "kl_temperature": kl_temperature, "models": metrics, "samples": samples}


def metrics_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The metrics as one flat row per model (the layout of metrics.parquet)."""
    rows = []
    for name, row in result["models"].items():
        flat = {"model": name}
        flat.update({k: v for k, v in row.items() if not k.endswith("_comparison")})
        for judge in ("rm", "llm"):
            counts = row.get(f"{judge}_comparison") or {}
            for key in ("wins", "losses", "ties"):
                flat[f"{judge}_{key}"] = counts.get(key)
        rows.append(flat)
    return rows


def write_eval_tables(result: dict[str, Any], folder: Path) -> dict[str, Path]:
    """Write metrics.parquet (one row per model) and samples.parquet (one row per prompt), atomically."""
    import pyarrow as pa

    from storage.atomic import write_parquet

    folder = Path(folder)
    rows = metrics_rows(result)
    metric_columns = list(dict.fromkeys(key for row in rows for key in row))
    metrics = pa.table(
        {key: pa.array([row.get(key) for row in rows], type=pa.string() if key == "model" else pa.float64())
         for key in metric_columns}
    )
    samples = pa.Table.from_pylist(result["samples"])
    return {
        "metrics": write_parquet(folder / "metrics.parquet", metrics),
        "samples": write_parquet(folder / "samples.parquet", samples),
    }
