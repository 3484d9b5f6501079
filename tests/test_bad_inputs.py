"""Bad inputs, one table: each case runs what a user runs (`alignflow ...` through flows.cli.main) and
checks the exact message (file, line or row, field), the exit code, and that the registry folder
(ALIGNFLOW_HOME) is byte-identical before and after: nothing was written before the error.

Run: OMP_NUM_THREADS=1 .venv/bin/pytest -q tests/test_bad_inputs.py
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Callable

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from flows.cli import main

TASK = {"instruction": "Summarize the text in one sentence.", "instances": [{"input": "Some text.", "output": "A summary."}]}
PNG = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x01"


@dataclass
class Ctx:
    """What a case builds its files and endpoints from."""

    tmp: Path
    root: Path
    endpoint: Callable[[str], str]  # mode -> base URL of a tiny misbehaving server
    model_dir: Callable[[], Path]
    real_server: Callable[[], str]


@dataclass
class Case:
    argv: list[str]
    lines: list[str]  # the exact stderr lines, each "alignflow COMMAND: MESSAGE"
    code: int = 2
    only_these_lines: bool = False  # stderr holds nothing else (config errors: no traceback, no run)
    not_written: list[Path] = field(default_factory=list)


def jsonl(path: Path, *records) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records), encoding="utf-8")
    return path


def seeds_case(path: Path, message: str) -> Case:
    return Case(["self-instruct", "--seeds", str(path)], [f"alignflow self-instruct: {path}: {message}"])


def corpus_case(source: str, message: str) -> Case:
    return Case(["pretrain", "--corpus", source], [f"alignflow pretrain: {message}"])


def labels_case(ctx: Ctx, path: Path, message: str) -> Case:
    argv = ["align", "--model", str(ctx.model_dir()), "--dataset", "self-instruct", "--judge", "file", "--labels-path", str(path)]
    return Case(argv, [f"alignflow align: {path}: {message}"])


def endpoint_case(url: str, model: str, message: str) -> Case:
    argv = ["self-instruct", "--generator", "openai", "--base-url", url, "--model", model, "--max-retries", "0"]
    return Case(argv, [f"alignflow self-instruct: {message}"], code=1)


# ---- the cases -----------------------------------------------------------------------------------


def seeds_invalid_json(ctx):
    path = jsonl(ctx.tmp / "seeds.jsonl", TASK, '{"instruction": "Say hi.", "instances": [', TASK | {"id": "b"})
    return seeds_case(path, "line 2: malformed JSON: Expecting value at column 42")


def seeds_missing_instruction(ctx):
    path = jsonl(ctx.tmp / "seeds.jsonl", TASK, TASK | {"instruction": None, "id": "b"}, TASK | {"id": "c"})
    path.write_text(path.read_text().replace('"instruction": null, ', ""))
    return seeds_case(path, "line 2: field 'instruction': missing")


def seeds_empty_file(ctx):
    path = ctx.tmp / "seeds.jsonl"
    path.write_text("\n  \n")
    return seeds_case(path, "the seed file contains no seed tasks")


def seeds_wrong_type(ctx):
    path = jsonl(ctx.tmp / "seeds.jsonl", TASK, TASK | {"id": "b", "instances": [{"input": "", "output": 42}]})
    return seeds_case(path, "line 2: field 'instances[0].output': expected a string, got number")


def seeds_wrong_type_of_classification(ctx):
    path = jsonl(ctx.tmp / "seeds.jsonl", TASK | {"is_classification": "yes"})
    return seeds_case(path, "line 1: field 'is_classification': expected true or false, got string")


def seeds_duplicate_id(ctx):
    path = jsonl(ctx.tmp / "seeds.jsonl", TASK | {"id": "a"}, "", TASK | {"id": "b"}, TASK | {"id": "a"})
    return seeds_case(path, "line 4: field 'id': duplicate seed id 'a', first used on line 1")


def seeds_mixed_encodings(ctx):
    path = ctx.tmp / "seeds.jsonl"
    utf8 = json.dumps(TASK | {"id": "a", "name": "café"}, ensure_ascii=False).encode("utf-8")
    latin1 = json.dumps(TASK | {"id": "b", "name": "naïve"}, ensure_ascii=False).encode("latin-1")
    path.write_bytes(utf8 + b"\n" + latin1 + b"\n")
    column = latin1.index(b"\xef") + 1
    return seeds_case(path, f"line 2: not valid UTF-8 (byte 0xef at column {column}); earlier lines hold UTF-8, "
                            "so the file mixes encodings; save the file as UTF-8")


def seeds_utf16(ctx):
    path = ctx.tmp / "seeds.jsonl"
    path.write_bytes((json.dumps(TASK) + "\n").encode("utf-16"))
    return seeds_case(path, "the file is UTF-16-encoded (it starts with a UTF-16 byte-order mark); save it as UTF-8")


def seeds_alpaca_item_without_output(ctx):
    path = ctx.tmp / "alpaca.json"
    path.write_text(json.dumps([{"instruction": "Name a color.", "input": "", "output": "Blue"},
                                {"instruction": "Name a fruit.", "input": ""}], indent=2))
    return seeds_case(path, "row 2 (line 7): field 'instances': missing (and no Alpaca 'output' field)")


def seeds_parquet_without_instruction(ctx):
    path = ctx.tmp / "seeds.parquet"
    pq.write_table(pa.table({"prompt": ["Name a color."], "output": ["Blue"]}), path)
    return seeds_case(path, "field 'instruction': missing column (columns present: prompt, output)")


def corpus_glob_matching_nothing(ctx):
    pattern = str(ctx.tmp / "data" / "*.jsonl")
    return corpus_case(pattern, f"{pattern}: the glob matches no files")


def corpus_parquet_without_text(ctx):
    path = ctx.tmp / "corpus.parquet"
    pq.write_table(pa.table({"id": [1, 2], "body": ["one", "two"]}), path)
    return corpus_case(str(path), f"{path}: field 'text': missing column (columns present: id, body)")


def corpus_binary_bytes(ctx):
    path = ctx.tmp / "notes.txt"
    path.write_bytes(PNG)
    return corpus_case(str(path), f"{path}: binary data (a NUL byte at offset 8), not UTF-8 text")


def corpus_jsonl_missing_text(ctx):
    path = jsonl(ctx.tmp / "corpus.jsonl", {"text": "fine"}, {"title": "no text here"})
    return corpus_case(str(path), f"{path}: line 2: field 'text': missing (fields present: title)")


def corpus_text_not_utf8(ctx):
    path = ctx.tmp / "notes.md"
    path.write_bytes("# Notes\n\nsecond paragraph\ncaf\xe9 au lait\n".encode("latin-1"))
    return corpus_case(str(path), f"{path}: line 4: not valid UTF-8 (byte 0xe9 at column 4); save the file as UTF-8")


def corpus_unsupported_suffix(ctx):
    path = ctx.tmp / "corpus.csv"
    path.write_text("text\nhello\n")
    return corpus_case(str(path), f"{path}: unsupported corpus file suffix '.csv'; use one of .txt, .md, .jsonl, .json, .parquet")


def config_unknown_preset(ctx):
    return Case(["pretrain", "--preset", "huge"], [
        "alignflow pretrain: error: argument --preset: invalid choice: 'huge' (choose from 'tiny', 'mini', 'small', 'base')"])


def config_negative_steps(ctx):
    return Case(["align", "--sft-max-steps", "-5"], ["alignflow align: --sft-max-steps: must be >= 1, got -5"], only_these_lines=True)


def config_threshold_above_one(ctx):
    return Case(["self-instruct", "--rouge-threshold", "1.5"],
                ["alignflow self-instruct: --rouge-threshold: must be <= 1.0, got 1.5"], only_these_lines=True)


def config_two_bad_options(ctx):
    return Case(["pretrain", "--max-steps", "0", "--holdout-fraction", "0.7"], [
        "alignflow pretrain: --max-steps: must be >= 1, got 0",
        "alignflow pretrain: --holdout-fraction: must be < 0.5, got 0.7"], only_these_lines=True)


def config_openai_without_model(ctx):
    return Case(["self-instruct", "--generator", "openai"], [
        "alignflow self-instruct: generator: backend 'openai' needs model: the name of the model the endpoint serves"],
        only_these_lines=True)


def config_dedup_threshold_above_one(ctx):
    source = jsonl(ctx.tmp / "in.jsonl", {"instruction": "Write a poem."})
    output = ctx.tmp / "kept.parquet"
    return Case(["dedup", "--input", str(source), "--threshold", "1.5", "--output", str(output)],
                ["alignflow dedup: error: --threshold must be in (0, 1], got 1.5"], only_these_lines=True, not_written=[output])


def config_version_that_does_not_exist(ctx):
    return Case(["align", "--dataset", "self-instruct@7"], [
        "alignflow align: --dataset 'self-instruct@7' is neither a file nor a registered dataset: "
        "dataset 'self-instruct' has no version 7 (versions: 1)"])


def config_extend_version_that_does_not_exist(ctx):
    return Case(["self-instruct", "--model", str(ctx.model_dir()), "--extend", "self-instruct@7"], [
        "alignflow self-instruct: --extend self-instruct@7: no such version (versions: 1)"])


def config_extend_dataset_not_made_by_self_instruct(ctx):
    return Case(["self-instruct", "--model", str(ctx.model_dir()), "--extend", "self-instruct"], [
        "alignflow self-instruct: --extend self-instruct: self-instruct@1 is not a self-instruct dataset "
        "(it has no instructions.parquet, instances.parquet, rejected.parquet)"])


def config_dataset_without_sft_table(ctx):
    return Case(["align", "--model", str(ctx.model_dir()), "--dataset", "corpus-clean"], [
        "alignflow align: --dataset 'corpus-clean': dataset corpus-clean@1 has no sft table (sft.parquet; it holds "
        "corpus.parquet); give a dataset made by self-instruct, or a Parquet file with prompt/completion or messages"])


def config_show_unknown_dataset(ctx):
    return Case(["datasets", "show", "nope@2"], [
        f"alignflow datasets: no dataset named 'nope' in {ctx.root} (known datasets: corpus-clean, self-instruct)"],
        only_these_lines=True)


def labels_parquet_without_chosen(ctx):
    path = ctx.tmp / "labels.parquet"
    pq.write_table(pa.table({"prompt": ["p"], "better": ["a"], "rejected": ["b"]}), path)
    return labels_case(ctx, path, "field 'chosen': missing column (columns present: prompt, better, rejected)")


def labels_null_chosen(ctx):
    path = ctx.tmp / "labels.parquet"
    pq.write_table(pa.table({"prompt": ["p", "q"], "chosen": ["a", None], "rejected": ["b", "c"]}), path)
    return labels_case(ctx, path, "row 2: field 'chosen': expected a string, got null")


def labels_missing_file(ctx):
    return labels_case(ctx, ctx.tmp / "labels.parquet", "no such file")


def dedup_invalid_json(ctx):
    source = ctx.tmp / "in.jsonl"
    source.write_text('{"instruction": "ok"}\n\n{"instruction": oops}\n')
    output = ctx.tmp / "kept.parquet"
    return Case(["dedup", "--input", str(source), "--output", str(output)],
                [f"alignflow dedup: error: {source}: line 3: malformed JSON: Expecting value at column 17"],
                only_these_lines=True, not_written=[output])


def dedup_missing_column(ctx):
    source = jsonl(ctx.tmp / "in.jsonl", {"prompt": "Write a poem."})
    output = ctx.tmp / "kept.parquet"
    return Case(["dedup", "--input", str(source), "--output", str(output)],
                [f"alignflow dedup: error: {source}: field 'instruction': missing column (columns present: prompt)"],
                only_these_lines=True, not_written=[output])


def endpoint_answers_html(ctx):
    url = ctx.endpoint("html")
    return endpoint_case(url, "m", f"--base-url: {url}/models answered an HTML page, not the OpenAI API; "
                                   "give the API's root, such as http://host:8000/v1")


def endpoint_answers_401(ctx):
    url = ctx.endpoint("401")
    return endpoint_case(url, "m", f"--api-key-secret: {url}/models refused the API key with HTTP 401 (invalid API key); "
                                   "give the key in the OPENAI_API_KEY environment variable or a Prefect Secret block (--api-key-secret)")


def endpoint_answers_truncated_json(ctx):
    url = ctx.endpoint("truncated")
    return endpoint_case(url, "m", f"--base-url: {url}/models answered something that is not JSON (truncated?): "
                                   "'{\"object\": \"list\", \"data\": [{\"id\": \"m'")


def endpoint_wrong_model_name(ctx):
    url = ctx.real_server()
    return endpoint_case(url, "gpt-4o", f"--model: {url} does not serve 'gpt-4o'; it serves tiny")


CASES = [
    seeds_invalid_json, seeds_missing_instruction, seeds_empty_file, seeds_wrong_type, seeds_wrong_type_of_classification,
    seeds_duplicate_id, seeds_mixed_encodings, seeds_utf16, seeds_alpaca_item_without_output, seeds_parquet_without_instruction,
    corpus_glob_matching_nothing, corpus_parquet_without_text, corpus_binary_bytes, corpus_jsonl_missing_text,
    corpus_text_not_utf8, corpus_unsupported_suffix,
    config_unknown_preset, config_negative_steps, config_threshold_above_one, config_two_bad_options,
    config_openai_without_model, config_dedup_threshold_above_one, config_version_that_does_not_exist,
    config_extend_version_that_does_not_exist, config_extend_dataset_not_made_by_self_instruct,
    config_dataset_without_sft_table, config_show_unknown_dataset,
    labels_parquet_without_chosen, labels_null_chosen, labels_missing_file,
    dedup_invalid_json, dedup_missing_column,
    endpoint_answers_html, endpoint_answers_401, endpoint_answers_truncated_json, endpoint_wrong_model_name,
]


# ---- the machinery -------------------------------------------------------------------------------


def snapshot(root: Path) -> dict[str, str | None]:
    """Every folder (None) and file (its sha256) under the registry root."""
    if not root.exists():
        return {}
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else None
            for p in sorted(root.rglob("*"))}


def fill_registry(root: Path) -> None:
    """Two registered datasets, so the snapshot has files to compare and refs to resolve."""
    from storage import atomic
    from storage.registry import Registry

    registry = Registry(root)
    with registry.new_version("dataset", "corpus-clean", config={"demo": True}) as draft:
        atomic.write_parquet(draft.path / "corpus.parquet", pa.table({"text": ["one document", "another one"]}))
    sft = pa.table({"prompt": [f"Say the number {i}." for i in range(8)], "completion": [str(i) for i in range(8)]})
    with registry.new_version("dataset", "self-instruct", config={"demo": True}) as draft:
        atomic.write_parquet(draft.path / "sft.parquet", sft)


class _Misbehaving(BaseHTTPRequestHandler):
    """Answers every request the same wrong way: an HTML page, a 401, or JSON cut in the middle."""

    mode = "html"

    def log_message(self, format, *args):  # noqa: A002 - quiet
        pass

    def _answer(self) -> None:
        if self.mode == "html":
            status, kind, body = 200, "text/html; charset=utf-8", b"<!doctype html><html><body>Welcome to nginx!</body></html>"
        elif self.mode == "401":
            status, kind, body = 401, "application/json", json.dumps({"error": {"message": "invalid API key"}}).encode()
        else:
            status, kind, body = 200, "application/json", b'{"object": "list", "data": [{"id": "m'
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = _answer


@pytest.fixture
def ctx(tmp_path, registry_root, tiny_model_dir):
    servers: list = []

    def endpoint(mode: str) -> str:
        server = ThreadingHTTPServer(("127.0.0.1", 0), type("Handler", (_Misbehaving,), {"mode": mode}))
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server.shutdown)
        return f"http://127.0.0.1:{server.server_address[1]}/v1"

    def real_server() -> str:
        from tasks.generation.local import LocalGenerator
        from tasks.generation.server import start_server

        url, stop = start_server(LocalGenerator(tiny_model_dir, identity_name="tiny", device="cpu"), host="127.0.0.1", port=0)
        servers.append(stop)
        return url

    fill_registry(registry_root)
    work = tmp_path / "inputs"
    work.mkdir()
    yield Ctx(work, registry_root, endpoint, lambda: tiny_model_dir, real_server)
    for stop in servers:
        stop()


@pytest.mark.parametrize("build", CASES, ids=[case.__name__ for case in CASES])
def test_bad_input(build, ctx):
    case = build(ctx)
    before = snapshot(ctx.root)
    # Not capsys: Prefect's log handler keeps the stream it first sees, and capsys closes its own.
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        try:
            code = main(case.argv)
        except SystemExit as exit_:  # argparse refuses an option before any command runs
            code = exit_.code
    err = stderr.getvalue()
    assert snapshot(ctx.root) == before, "the registry changed"
    for path in case.not_written:
        assert not path.exists(), path
    lines = err.splitlines()
    for line in case.lines:
        assert line in lines, f"{line!r} not in stderr:\n{err}"
    if case.only_these_lines:
        assert lines == case.lines
    assert "Traceback" not in "\n".join(line for line in lines if line.startswith("alignflow"))
    assert code == case.code


def test_there_are_at_least_25_cases():
    assert len(CASES) >= 25


def test_a_utf8_bom_is_accepted_where_windows_editors_write_one(tmp_path):
    """Not an error: Notepad saves UTF-8 with a byte-order mark, and users expect the file to load."""
    from tasks.pretrain.corpus import read_corpus
    from tasks.self_instruct.seeds import load_seed_tasks

    seeds = tmp_path / "seeds.jsonl"
    seeds.write_bytes(b"\xef\xbb\xbf" + (json.dumps(TASK) + "\r\n").encode())
    assert [t.instruction for t in load_seed_tasks(seeds)] == [TASK["instruction"]]
    notes = tmp_path / "notes.txt"
    notes.write_bytes(b"\xef\xbb\xbfFirst paragraph.\r\n\r\nSecond.\r\n")
    assert [(d.text, d.line) for d in read_corpus([str(notes)])] == [("First paragraph.", 1), ("Second.", 3)]
