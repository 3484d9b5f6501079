"""The `alignflow` command line: each flow command builds the flow's pydantic config and runs it.

    alignflow pretrain --max-steps 300
    alignflow models list
    alignflow models show base
    alignflow datasets show corpus-clean@1

Options are generated from the config models, so the command line, the Prefect UI form and the
flow parameters always agree: a nested model's fields appear as flat options (`--max-steps`,
not `--training.max-steps`), and every option's help is the field's description.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import types
import typing
from typing import Any, Literal, Sequence, get_args, get_origin

from pydantic import BaseModel, ValidationError

from storage.errors import AlignflowError
from tasks.align.gates import QualityGateFailed


# ---- pydantic model -> argparse options ----------------------------------------------------------


def _unwrap_optional(annotation: Any) -> Any:
    if get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


def _is_model(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def model_options(model: type[BaseModel], path: tuple[str, ...] = ()) -> list[tuple[str, tuple[str, ...], Any, Any]]:
    """(option name, field path, annotation, field info) for every leaf field, nested models flattened."""
    out = []
    for name, info in model.model_fields.items():
        annotation = _unwrap_optional(info.annotation)
        if _is_model(annotation):
            out.extend(model_options(annotation, path + (name,)))
        else:
            out.append((name.replace("_", "-"), path + (name,), annotation, info))
    return out


# Option names fixed by DESIGN.md where the field name reads worse on a command line.
RENAMED = {"backend": "generator"}


def command_line_options(model: type[BaseModel]) -> list[tuple[str, tuple[str, ...], Any, Any]]:
    """(option name without "--", field path, annotation, field info) for every leaf field, as the CLI names them.

    A field name that occurs in two nested models is prefixed with its parent's name
    (`--cleaning-seed` beside `--training-seed`) so that neither is silently shadowed.
    """
    options = [(RENAMED.get(option, option), path, annotation, info) for option, path, annotation, info in model_options(model)]
    counts: dict[str, int] = {}
    for option, *_ in options:
        counts[option] = counts.get(option, 0) + 1
    return [("-".join(p.replace("_", "-") for p in path) if counts[option] > 1 else option, path, annotation, info)
            for option, path, annotation, info in options]


def add_model_arguments(parser: argparse.ArgumentParser, model: type[BaseModel], skip: Sequence[str] = ()) -> None:
    """Add one option per leaf field (named by `command_line_options`); unset options keep the model's defaults."""
    for option, path, annotation, info in command_line_options(model):
        if option in skip:
            continue
        default = info.get_default(call_default_factory=True)
        help_text = (info.description or "").replace("%", "%%") + (f" (default: {default})" if default not in (None, [], "") else "")
        kwargs: dict[str, Any] = {"dest": "__".join(path), "default": argparse.SUPPRESS, "help": help_text,
                                  "metavar": option.upper().replace("-", "_")}
        origin = get_origin(annotation)
        if annotation is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
            del kwargs["metavar"]
        elif origin is Literal:
            kwargs["choices"] = list(get_args(annotation))
            kwargs["type"] = type(get_args(annotation)[0])
            del kwargs["metavar"]
        elif origin in (list, tuple, Sequence):
            item = (get_args(annotation) or (str,))[0]
            kwargs["nargs"] = "*"
            kwargs["type"] = item if item in (int, float, str) else str
        elif annotation in (int, float, str):
            kwargs["type"] = annotation
        else:
            kwargs["type"] = str
        parser.add_argument(f"--{option}", **kwargs)


class ConfigError(AlignflowError, ValueError):
    """Command-line options that do not make a valid config: one line per bad field, naming its option."""

    def __init__(self, lines: Sequence[str]):
        self.lines = list(lines)
        super().__init__("\n".join(self.lines))


# pydantic error types whose limit reads best as a comparison: "must be >= 1, got -5".
_COMPARISONS = {"greater_than_equal": ("ge", ">="), "greater_than": ("gt", ">"),
                "less_than_equal": ("le", "<="), "less_than": ("lt", "<")}


def validation_lines(error: ValidationError, model: type[BaseModel] | None = None) -> list[str]:
    """One line per invalid field: `--sft-max-steps: must be >= 1, got -5`.

    With `model`, a field is named by its command-line option; else by its dotted path.
    """
    options = {path: f"--{option}" for option, path, _, _ in command_line_options(model)} if model else {}
    lines = []
    for item in error.errors():
        loc = tuple(str(part) for part in item["loc"])
        name = ".".join(loc) or "config"
        for size in range(len(loc), 0, -1):  # a list item's index follows its option: --corpus[1]
            if loc[:size] in options:
                name = options[loc[:size]] + "".join(f"[{part}]" for part in loc[size:])
                break
        kind, context, message = item["type"], item.get("ctx") or {}, item["msg"]
        if kind in _COMPARISONS:
            key, sign = _COMPARISONS[kind]
            message = f"must be {sign} {context[key]}"
        elif kind == "value_error":
            message = message.removeprefix("Value error, ")
        elif message.startswith("Input should be "):
            message = "must be " + message[len("Input should be "):]
        elif kind == "missing":
            message = "is required"
        value = item.get("input")
        if kind != "missing" and not isinstance(value, (dict, BaseModel)):
            message += f", got {value!r}"
        lines.append(f"{name}: {message}")
    return lines


def config_from_args(model: type[BaseModel], args: argparse.Namespace) -> BaseModel:
    """Build `model` from the options given on the command line (nested by their field paths).

    Invalid values raise `ConfigError`, whose lines name each bad option and what it must be.
    """
    data: dict[str, Any] = {}
    for dest, value in vars(args).items():
        if "__" not in dest and dest not in model.model_fields:
            continue
        path = dest.split("__")
        node = data
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(validation_lines(exc, model)) from None


# ---- commands ----------------------------------------------------------------------------------


def run_pretrain(args: argparse.Namespace) -> int:
    from flows.pretrain import pretrain
    from tasks.pretrain.steps import PretrainConfig

    config = config_from_args(PretrainConfig, args)
    ref = pretrain(config)
    print(f"registered model: {ref}")
    return 0


def run_self_instruct(args: argparse.Namespace) -> int:
    from flows.self_instruct import self_instruct
    from tasks.self_instruct.pipeline import SelfInstructConfig

    ref = self_instruct(config_from_args(SelfInstructConfig, args))
    print(f"registered dataset: {ref}")
    return 0


def run_align(args: argparse.Namespace) -> int:
    from flows.align import align
    from tasks.align.steps import AlignConfig

    refs = align(config_from_args(AlignConfig, args))
    print_align_summary(refs)
    return 0


def run_pipeline(args: argparse.Namespace) -> int:
    from flows.pipeline import PipelineConfig, pipeline

    refs = pipeline(config_from_args(PipelineConfig, args))
    print_align_summary(refs)
    return 0


def print_align_summary(refs: dict[str, str]) -> None:
    import pyarrow.parquet as pq

    from storage.registry import Registry

    for stage, ref in refs.items():
        print(f"registered {stage}: {ref}")
    if "eval" not in refs:
        return
    version = Registry().resolve("dataset", refs["eval"])
    print("\nevaluation on test prompts:")
    for row in pq.read_table(version.path / "metrics.parquet").to_pylist():
        print("  " + "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
    gates = json.loads((version.path / "evaluation.json").read_text()).get("gates", {})
    if gates:
        print("\nquality gates (test split, each stage against the one before it):")
        print(f"  {'stage':<6} {'metric':<14} {'baseline':>9} {'value':>9} {'se':>8}  verdict")
        for stage, gate in gates.items():
            se = "-" if gate["se"] is None else f"{gate['se']:.4f}"
            extra = ""
            if gate.get("kl") is not None:
                extra = f"  KL {gate['kl']:.3f}"
            if gate.get("independent"):
                ind = gate["independent"]
                extra += f"  {ind['metric']} {ind['sft']:.3f} -> {ind['ppo']:.3f}"
            print(f"  {stage:<6} {gate['metric']:<14} {gate['baseline']:>9.4f} {gate['value']:>9.4f} {se:>8}  "
                  f"{'passed' if gate['passed'] else 'FAILED'}{extra}")


def _print_version(registry, kind: str, ref: str) -> None:
    version = registry.resolve(kind, ref)
    m = version.manifest
    print(f"{kind} {version.ref}   created {m.created_at}   code {m.code_version}   flow run {m.flow_run_id or '-'}")
    print(f"  path: {version.location}")
    print("  files:")
    for path, info in m.files.items():
        rows = f", {info['rows']} rows" if "rows" in info else ""
        print(f"    {path}  ({info['bytes']} bytes{rows}, sha256 {info['sha256'][:12]})")
        if "schema" in info:
            print("      schema: " + ", ".join(f"{k}: {v}" for k, v in info["schema"].items()))
    if m.metrics:
        print("  metrics:")
        for key, value in m.metrics.items():
            print(f"    {key}: {value:.4g}" if isinstance(value, float) else f"    {key}: {value}")
    for key, value in m.extra.items():
        if key != "fingerprint" and isinstance(value, dict):
            print(f"  {key}: " + ", ".join(f"{k}={v}" for k, v in value.items()))
    print("  lineage:")
    for depth, k, ancestor in registry.lineage(kind, version.ref):
        print(f"    {'  ' * depth}{'<- ' if depth else ''}{k} {ancestor.ref}")


def run_registry(args: argparse.Namespace) -> int:
    from storage.registry import Registry, describe

    registry = Registry()
    kind = args.kind
    if args.action == "show":
        _print_version(registry, kind, args.ref)
        return 0
    names = [args.name] if args.name else registry.names(kind)
    if not names:
        print(f"no {kind}s in {registry.root}")
    for name in names:
        for version in registry.versions(kind, name):
            info = describe(version)
            rows = ", ".join(f"{k}: {v}" for k, v in info["rows"].items())
            parents = ", ".join(info["parents"]) or "-"
            print(f"{info['ref']:<28} {info['created_at'][:19]}  {rows or '':<30} parents: {parents}")
    return 0


# Flow commands: (the config class they build, their help line, what runs them). Config classes
# import Prefect, torch and transformers, so a command imports only its own (see build_parser).
FLOW_COMMANDS: dict[str, tuple[str, str, Any]] = {
    "pretrain": ("tasks.pretrain.steps:PretrainConfig", "Clean a corpus, train a tokenizer and pretrain a base model.", run_pretrain),
    "self-instruct": ("tasks.self_instruct.pipeline:SelfInstructConfig", "Bootstrap an instruction dataset from seed tasks.", run_self_instruct),
    "align": ("tasks.align.steps:AlignConfig", "SFT, preference pairs, reward model, PPO and evaluation.", run_align),
    "pipeline": ("flows.pipeline:PipelineConfig", "pretrain -> self-instruct -> align, end to end.", run_pipeline),
}


def config_class(path: str) -> type[BaseModel]:
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The `alignflow` parser. With `only`, flow commands other than that one get their help line
    but no options, so `alignflow dedup` or `alignflow models list` start without importing the flows."""
    parser = argparse.ArgumentParser(prog="alignflow", description="From a corpus and a few seed tasks to an aligned language model, on Prefect.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    for name, (path, help_text, run) in FLOW_COMMANDS.items():
        if only is None or only == name:
            model = config_class(path)
            command = commands.add_parser(name, help=help_text, description=model.__doc__)
            add_model_arguments(command, model)
        else:
            command = commands.add_parser(name, help=help_text)
        command.set_defaults(func=run)

    for kind in ("dataset", "model"):
        group = commands.add_parser(f"{kind}s", help=f"List or show registered {kind}s.")
        actions = group.add_subparsers(dest="action", required=True)
        listing = actions.add_parser("list", help=f"Every version of every {kind} (or of one name).")
        listing.add_argument("name", nargs="?", help=f"Only this {kind} name.")
        show = actions.add_parser("show", help="Files, schema, row counts, metrics and lineage of one version.")
        show.add_argument("ref", help="NAME (the latest version) or NAME@VERSION.")
        group.set_defaults(func=run_registry, kind=kind)

    for module in ("tasks.rouge.cli",):
        try:
            register = __import__(module, fromlist=["register"]).register
        except ImportError:
            continue
        register(commands)
    return parser


# Library loggers whose records Prefect forwards to the run log (read when prefect is imported).
EXTRA_LOGGERS = "transformers,trl,accelerate,peft,tasks"


def main(argv: Sequence[str] | None = None) -> int:
    import os

    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", EXTRA_LOGGERS)
    argv = list(sys.argv[1:] if argv is None else argv)
    from storage.registry import RegistryError

    parser = build_parser(only=argv[0] if argv else "")
    args = parser.parse_args(argv)
    # Bad input (options, files, refs) exits 2, a failed stage 1; both with a message, no traceback.
    try:
        return args.func(args) or 0
    except ConfigError as exc:
        return _fail(args.command, exc.lines, 2)
    except ValidationError as exc:
        return _fail(args.command, validation_lines(exc), 2)
    except (RegistryError, FileNotFoundError, ValueError) as exc:
        return _fail(args.command, [str(exc)], 2)
    except QualityGateFailed as exc:
        return _fail(args.command, [f"stopped by a quality gate: {exc}"], 3)
    except AlignflowError as exc:
        return _fail(args.command, [str(exc)], 1)
    finally:
        if args.command in FLOW_COMMANDS:
            from tasks.timing import time_report

            report = time_report()
            if report:
                print("\n" + report)


def _fail(command: str, lines: Sequence[str], code: int) -> int:
    for line in lines:
        print(f"alignflow {command}: {line}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
