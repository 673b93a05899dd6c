"""One command line for every picollm command: Hydra overrides, applied by Hydra's own machinery.

    python -m picollm.<command> key=value +key=value ...   settings (Hydra's override grammar)
    python -m picollm.<command> --help                     usage, then every setting with its type and default
    python -m picollm.<command> --cfg job [overrides]      the composed config as YAML; nothing runs
    python -m picollm.train -m key=a,b other.key=1,2       one run per combination, in sibling run dirs

Values follow Hydra's grammar: ``null`` is unset, ``[a,b]`` a list, and text with commas,
parentheses, brackets or a space at either end (Hydra strips unquoted ones) goes in quotes
that reach Hydra, so the shell needs its own around them: ``prompt='"def f(x):"'`` or
``prompt="'def '"``.

Each command calls ``parse`` (``parse_runs`` for train) with its schema: a dataclass of its
own settings (a structured config), or None for the configs/config.yaml tree that train,
plan, sweep and prepare share, composed and checked by ``config.load_config``.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import hashlib
import itertools
import re
import sys
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from hydra._internal.config_loader_impl import ConfigLoaderImpl
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override
from hydra.errors import HydraException
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from picollm.config import CONFIG_DIR, ConfigError, hydra_message, load_config

# Every command: name -> the module whose main(argv) runs it. pyproject.toml installs each as
# the console script picollm-<name> (tests/test_cli.py checks the two agree).
COMMANDS: dict[str, str] = {
    "train": "picollm.train",
    "plan": "picollm.plan",
    "calculator": "picollm.calculator",
    "sweep": "picollm.sweep",
    "prepare": "picollm.data.prepare",
    "sample": "picollm.sample",
    "evaluate": "picollm.evaluate",
    "export": "picollm.export",
    "report": "picollm.report",
    "checkpoint": "picollm.checkpoint",
    "fit": "picollm.fit",
}

GRAMMAR = ("values follow Hydra's override grammar: null for unset, [a,b] for a list; quote text with commas, "
           "parentheses, brackets or a space at either end, inside the shell's quotes: prompt='\"def f(x):\"'")


# ----------------------------------------------------------------------------- declaring a schema

def setting(default: Any, help: str, shown: Optional[str] = None) -> Any:
    """A schema field with a default; ``shown`` replaces the default in --help."""
    meta = {"help": help, **({"shown": shown} if shown else {})}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: copy.deepcopy(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def required(help: str) -> Any:
    """A field the command cannot run without (``--cfg job`` still prints it, as ???)."""
    return dataclasses.field(default=MISSING, metadata={"help": help, "required": True})


def from_run(key: str, help: str) -> Any:
    """A field that, left out, takes the run's own ``key`` (read it with ``given``)."""
    return dataclasses.field(default=MISSING, metadata={"help": help, "shown": f"the run's {key}"})


def given(cfg: DictConfig, key: str) -> bool:
    """Whether ``key`` has a value (a ``from_run`` field that was not set has none)."""
    return not OmegaConf.is_missing(cfg, key)


# ----------------------------------------------------------------------------- the command

@dataclass(frozen=True)
class Command:
    name: str  # a COMMANDS key, optionally with a subcommand: "report compare"
    usage: str
    schema: Optional[type] = None  # None: the configs/config.yaml tree

    @property
    def prog(self) -> str:
        head, _, sub = self.name.partition(" ")
        return f"python -m {COMMANDS[head]}" + (f" {sub}" if sub else "")


def _refuse(sentence: str) -> SystemExit:
    return SystemExit(f"error: {sentence}")


@dataclass
class _Argv:
    overrides: list[str]
    print_cfg: bool = False
    multirun: bool = False


def _read_argv(argv: list[str], cmd: Command) -> _Argv:
    """Split argv into overrides and the flags picollm honours; --help prints and exits."""
    if any(a in ("-h", "--help") for a in argv):
        print(help_text(cmd))
        raise SystemExit(0)
    out, rest = _Argv([]), list(argv)
    while rest:
        arg = rest.pop(0)
        if arg in ("--cfg", "-c"):
            what = rest.pop(0) if rest else "(nothing)"
            if what != "job":
                raise _refuse(f"{arg} {what} is not supported; picollm uses no Hydra job config, so "
                              "--cfg job (the composed config) is the one to print.")
            out.print_cfg = True
        elif arg in ("-m", "--multirun"):
            out.multirun = True
        elif arg.startswith("-"):
            raise _refuse(f"{arg} is not an option of {cmd.prog}, which takes key=value overrides, --help, "
                          "--cfg job and (train only) -m/--multirun.")
        else:
            out.overrides.append(arg)
    return out


def _parse_overrides(overrides: list[str], cmd: Command, multirun: bool) -> list[Override]:
    """Hydra's own parse of the overrides, refusing what picollm would otherwise ignore or
    misread: Hydra's settings (hydra.*), and value lists without -m."""
    for arg in overrides:
        if "=" not in arg and not arg.startswith("~"):
            raise _refuse(f"argument {arg!r} is not key=value; {cmd.usage.splitlines()[0]}")
    parser, parsed = OverridesParser.create(), []
    for arg in overrides:
        try:
            parsed += parser.parse_overrides([arg])
        except HydraException as err:  # its second line is a link to Hydra's grammar page
            raise _refuse(f"could not read {arg!r} ({str(err).splitlines()[0]}); {GRAMMAR}.") from None
    for o in parsed:
        if o.key_or_group == "hydra" or o.is_hydra_override():
            raise _refuse(f"{o.input_line} sets Hydra's own runtime config, which picollm does not use "
                          "(it composes configs and writes no Hydra output folders); remove it"
                          + (", and choose where a run writes with run_dir=DIR." if cmd.schema is None else "."))
        if o.is_sweep_override() and not multirun:
            raise _refuse(_not_a_sweep(o.input_line, cmd))
    return parsed


def _not_a_sweep(line: str, cmd: Command) -> str:
    how = "use brackets for a list (key=[a,b]) or quotes for text (key=\"'a,b'\")"
    if cmd.name == "train":
        return f"{line} lists several values; add -m to train each in turn, or {how}."
    return f"{line} lists several values, but {cmd.prog} takes one per setting; {how}; {_multirun_pointer(cmd)}"


def _multirun_pointer(cmd: Command) -> str:
    if cmd.name == "sweep":
        return "its grid is sweep.budgets x sweep.sizes (python -m picollm.train -m key=a,b trains other grids)."
    return ("for a grid of training runs use python -m picollm.sweep (IsoFLOP grids) "
            "or python -m picollm.train -m key=a,b.")


# ----------------------------------------------------------------------------- composing

def _compose(cmd: Command, overrides: list[str], parsed: list[Override] = ()) -> DictConfig:
    if cmd.schema is None:
        try:
            return load_config(overrides, command=cmd.prog)
        except ConfigError as err:
            raise _refuse(str(err)) from None
    _check_keys(cmd, parsed)
    # Hydra's own override step (what compose runs after the defaults list) on the schema
    # alone: compose would read a setting named like one of the ConfigStore's groups
    # (export's tokenizer=false) as a group choice.
    cfg = OmegaConf.structured(cmd.schema)
    try:
        ConfigLoaderImpl._apply_overrides_to_config(list(parsed), cfg)
        OmegaConf.resolve(cfg)
    except (HydraException, OmegaConfBaseException) as err:
        raise _refuse(hydra_message(err, see=f"`{cmd.prog} --help` for its settings")) from None
    return cfg


def _check_keys(cmd: Command, parsed: list[Override]) -> None:
    """Keys the schema lacks, with the close match; Hydra's own text would point to +key."""
    names = [f.name for f in dataclasses.fields(cmd.schema)]
    for o in parsed:
        if o.is_delete():  # every setting must exist: leaving it out gives its default
            raise _refuse(f"{o.input_line} would delete a setting of {cmd.prog}; leave it out for its default.")
        key = o.key_or_group.split(".")[0]
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise _refuse(f"unknown setting {key!r} for {cmd.prog}{hint}; its settings are {', '.join(names)}.")


def _require(cfg: DictConfig, cmd: Command) -> None:
    for f in dataclasses.fields(cmd.schema) if cmd.schema else ():
        if f.metadata.get("required") and OmegaConf.is_missing(cfg, f.name):
            raise _refuse(f"{f.name}= is required; {cmd.usage.splitlines()[0]}")


def _print_configs(cfgs: list[DictConfig], names: list[str]) -> None:
    """--cfg job: the composed config(s) as YAML, then exit without doing any work."""
    for cfg, name in zip(cfgs, names):
        if name:
            print(f"# multirun point {name}: run_dir={cfg.run_dir}")
        print(OmegaConf.to_yaml(cfg), end="")  # already resolved; a required field left out shows as ???
    raise SystemExit(0)


def parse(argv: Optional[list], command: str, usage: str, schema: Optional[type] = None) -> DictConfig:
    """The checked config of one run of ``command`` from argv (sys.argv[1:] when None).
    Bad input exits with one sentence (SystemExit "error: ..."), before any work."""
    cmd = Command(command, usage, schema)
    args = _read_argv(list(sys.argv[1:] if argv is None else argv), cmd)
    if args.multirun:
        raise _refuse(f"{cmd.prog} does not take -m/--multirun; {_multirun_pointer(cmd)}")
    cfg = _compose(cmd, args.overrides, _parse_overrides(args.overrides, cmd, multirun=False))
    if args.print_cfg:
        _print_configs([cfg], [""])
    _require(cfg, cmd)
    return cfg


# ----------------------------------------------------------------------------- multirun (train)

def parse_runs(argv: Optional[list], command: str, usage: str) -> list[DictConfig]:
    """Like ``parse`` for the config tree, but ``-m`` with comma lists (or range(...)) gives
    one config per combination, each in its own directory under one parent, named from its
    swept values: run_dir=DIR -m model.depth=2,3 -> DIR/model.depth-2, DIR/model.depth-3.
    Every point is composed and checked before the first one runs."""
    cmd = Command(command, usage)
    args = _read_argv(list(sys.argv[1:] if argv is None else argv), cmd)
    parsed = _parse_overrides(args.overrides, cmd, multirun=args.multirun)
    points = sweep_points(parsed)
    cfgs = [_compose(cmd, lines) for _, lines in points]
    names = [name for name, _ in points]
    if names != [""]:
        _place(cfgs, names, [o.input_line for o in parsed if not o.is_sweep_override()])
    if args.print_cfg:
        _print_configs(cfgs, names)
    return cfgs


def sweep_points(parsed: list[Override]) -> list[tuple[str, list[str]]]:
    """(name, overrides) of every combination of the swept values, expanded by Hydra's own
    parser as its basic sweeper does; name is "" when nothing is swept."""
    axes = []
    for o in parsed:
        if not o.is_sweep_override():
            axes.append([("", o.input_line)])
            continue
        if o.key_or_group == "run_dir":
            raise _refuse(f"{o.input_line}: run_dir cannot be swept; multirun puts each point in "
                          "run_dir/<its swept values>.")
        try:
            values = list(o.sweep_string_iterator())
        except HydraException:
            raise _refuse(f"{o.input_line} is not a list picollm can enumerate; give the values: key=a,b,c "
                          "or key=range(start,stop,step).") from None
        key = o.get_key_element()
        label = o.key_or_group.replace("/", ".")
        axes.append([(f"{label}-{_safe(v)}", f"{key}={v}") for v in values])
    points = [("_".join(n for n, _ in combo if n), [line for _, line in combo]) for combo in itertools.product(*axes)]
    names = [n for n, _ in points]
    if len(set(names)) < len(names):
        raise _refuse("two multirun points would share a directory name (values that differ only in punctuation); "
                      "sweep values that differ in letters or digits.")
    return points


def _safe(value: str) -> str:
    """A swept value as a folder-name part that Hydra's grammar reads back unquoted."""
    return re.sub(r"[^A-Za-z0-9.+-]+", "_", value).strip("_") or "empty"


def _place(cfgs: list[DictConfig], names: list[str], shared: list[str]) -> None:
    """Each point's run_dir: run_dir (when given) or runs/multirun-<hash of the overrides the
    points share>, then the point's name; the same command lands in the same folders and resumes."""
    digest = hashlib.sha256("\0".join(sorted(shared)).encode()).hexdigest()[:10]
    parent = cfgs[0].run_dir or f"runs/multirun-{digest}"
    for cfg, name in zip(cfgs, names):
        cfg.run_dir = str(Path(parent) / name)


# ----------------------------------------------------------------------------- --help

def help_text(cmd: Command) -> str:
    lines = [cmd.usage, ""]
    lines += _tree_help(cmd) if cmd.schema is None else _schema_help(cmd.schema)
    multirun = ("-m key=a,b trains each value in turn, in sibling run dirs." if cmd.name == "train"
                else f"-m/--multirun is not taken: {_multirun_pointer(cmd)}")
    lines += ["", GRAMMAR + ".", "--cfg job prints the composed settings as YAML and exits.", multirun]
    return "\n".join(lines)


def _tree_help(cmd: Command) -> list[str]:
    lines = ["config groups (pick with group=name):"]
    for group in sorted(p for p in CONFIG_DIR.iterdir() if p.is_dir()):
        names = sorted(f.stem for f in group.glob("*.yaml"))
        lines.append(f"  {group.name}: {', '.join(names)}")
    lines += ["any field: key=value, e.g. budget.minutes=5 train.dtype=fp32 model.depth=4",
              f"every field with its value: {cmd.prog} --cfg job [overrides]; what each means: picollm/config.py"]
    return lines


def _type_name(kind: Any) -> str:
    args = [a for a in typing.get_args(kind) if a is not type(None)]
    if typing.get_origin(kind) is typing.Union and len(args) == 1:
        return f"{_type_name(args[0])} or null"
    if typing.get_origin(kind) in (list, typing.List):
        return f"list of {_type_name(args[0])}"
    return getattr(kind, "__name__", str(kind))


def _schema_help(schema: type) -> list[str]:
    hints = typing.get_type_hints(schema)
    rows = []
    for f in dataclasses.fields(schema):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        shown = f.metadata.get("shown") or ("required" if f.metadata.get("required") else _yaml_value(default))
        rows.append((f.name, _type_name(hints[f.name]), shown, f.metadata.get("help", "")))
    widths = [max(len(r[i]) for r in rows + [("setting", "type", "default", "")]) for i in range(3)]
    fmt = lambda r: "  " + "  ".join(c.ljust(w) for c, w in zip(r[:3], widths)) + "  " + r[3]
    return ["settings (key=value):", fmt(("setting", "type", "default", ""))] + [fmt(r) for r in rows]


def _yaml_value(value: Any) -> str:
    return OmegaConf.to_yaml({"v": value}).strip()[3:]
