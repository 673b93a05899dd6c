"""One command line for every command (picollm/cli.py): --help, --cfg job, Hydra's errors,
refused Hydra settings and multirun. Each command's main(argv) runs in this process."""

import dataclasses
import importlib
import json
import tomllib
import typing
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from picollm import cli
from picollm.config import CONFIG_DIR
from tests.conftest import TINY

REPO = Path(__file__).resolve().parents[1]

# Every command: its schema (None: the configs/ tree) and a line --cfg job prints with no overrides.
TABLE = {
    "train": (None, "tokens_per_param: 20.0"),
    "plan": (None, "law: epoch"),
    "calculator": (None, "mfu: 0.4"),
    "sweep": (None, "sizes: 5"),
    "prepare": (None, "text_field: text"),
    "sample": ("SampleArgs", "device: auto"),
    "evaluate": ("EvaluateArgs", "dtype: auto"),
    "export": ("ExportArgs", "tokenizer: true"),
    "report": ("ReportArgs", "samples: false"),
    "checkpoint": ("CheckpointArgs", "src: ???"),  # required: --cfg job still prints it
    "fit": ("FitArgs", "bootstrap: 100"),
}


def main_of(command: str):
    return importlib.import_module(cli.COMMANDS[command]).main


def schema_of(command: str):
    name = TABLE[command][0]
    return name and getattr(importlib.import_module(cli.COMMANDS[command]), name)


def refusal(command: str, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as err:
        main_of(command)(argv)
    assert isinstance(err.value.code, str) and err.value.code.startswith("error: "), err.value.code
    return err.value.code


def test_the_table_covers_every_command_and_each_has_a_console_script():
    assert set(TABLE) == set(cli.COMMANDS)
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {f"picollm-{name}": f"{module}:main" for name, module in cli.COMMANDS.items()}


@pytest.mark.parametrize("command", sorted(TABLE))
def test_help_lists_every_field_with_type_and_default(command, capsys):
    with pytest.raises(SystemExit) as done:
        main_of(command)(["--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith("usage: python -m " + cli.COMMANDS[command])
    schema = schema_of(command)
    if schema is None:  # the tree: every group with its options, and how to see every field
        for group in (p for p in CONFIG_DIR.iterdir() if p.is_dir()):
            assert f"  {group.name}: {', '.join(sorted(f.stem for f in group.glob('*.yaml')))}" in text
        assert "--cfg job" in text
        return
    rows = {line.split()[0]: line for line in text.splitlines() if line.startswith("  ")}
    for f in dataclasses.fields(schema):
        assert f.name in rows, f.name
        default = "required" if f.metadata.get("required") else f.metadata.get("shown")
        if default is None:
            default = OmegaConf.to_yaml({"v": f.default_factory() if callable(f.default_factory) else f.default})[3:]
        assert default.strip() in rows[f.name], rows[f.name]
        optional = type(None) in typing.get_args(typing.get_type_hints(schema)[f.name])
        assert ("or null" in rows[f.name]) == optional, rows[f.name]


@pytest.mark.parametrize("command", sorted(TABLE))
def test_cfg_job_prints_the_composed_yaml_and_does_no_work(command, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # anything a command wrote would land here
    with pytest.raises(SystemExit) as done:
        main_of(command)(["--cfg", "job"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert TABLE[command][1] in out.splitlines() or f"  {TABLE[command][1]}" in out.splitlines()
    OmegaConf.create(out)  # it is YAML
    assert list(tmp_path.iterdir()) == []


def test_cfg_job_shows_the_overrides(capsys):
    with pytest.raises(SystemExit):
        main_of("plan")(["--cfg", "job", "model=tiny", "budget.compute=3e12"])
    cfg = OmegaConf.create(capsys.readouterr().out)
    assert cfg.model.n_layer == 2 and cfg.budget.compute == 3e12


@pytest.mark.parametrize("command", sorted(TABLE))
def test_hydra_settings_are_refused_not_ignored(command):
    message = refusal(command, ["hydra.run.dir=x"])
    assert message.startswith("error: hydra.run.dir=x sets Hydra's own runtime config, which picollm does not use")
    assert len(message.splitlines()) == 1


@pytest.mark.parametrize("command", sorted(set(TABLE) - {"train"}))
def test_multirun_is_refused_pointing_to_the_sweep(command):
    prog = "python -m " + cli.COMMANDS[command]
    for flag in ("-m", "--multirun"):
        message = refusal(command, [flag, "a=1,2"])
        assert message.startswith(f"error: {prog}") and " does not take -m/--multirun; " in message
        assert "python -m picollm.sweep" in message
        assert len(message.splitlines()) == 1
    # A comma list without -m gets one consistent sentence too (not Hydra's "add --multirun").
    message = refusal(command, ["a=1,2"])
    assert "lists several values" in message and "--multirun" not in message and "picollm.sweep" in message


@pytest.mark.parametrize("command", sorted(TABLE))
def test_a_bad_choice_shows_the_options(command):
    if schema_of(command) is None:  # Hydra's full text: the group's options are the fix
        message = refusal(command, ["model=gpt3"])
        assert "Could not find 'model/gpt3'" in message and f"see `python -m {cli.COMMANDS[command]} --help`" in message
        assert [line.strip() for line in message.splitlines()[1:]] == ["Available options in 'model':", "default",
                                                                      "gpt2", "reference", "tiny"]
    else:  # no groups: an unknown setting lists the settings there are
        message = refusal(command, ["nosuch=1"])
        names = ", ".join(f.name for f in dataclasses.fields(schema_of(command)))
        assert message.startswith(f"error: unknown setting 'nosuch' for python -m {cli.COMMANDS[command]}")
        assert message.endswith(f"; its settings are {names}.")


def test_hydra_type_errors_keep_their_whole_text():
    message = refusal("train", ["train.steps=abc"])
    assert "train.steps=abc: Value 'abc' of type 'str' could not be converted to Integer" in message
    assert "full_key: train.steps" in message  # the cause's detail, not only its first line
    message = refusal("sample", ["run_dir=x", "prompt=y", "max_tokens=abc"])
    assert "max_tokens=abc: Value 'abc' of type 'str' could not be converted to Integer" in message
    assert "see `python -m picollm.sample --help` for its settings" in message


def test_unknown_flags_are_refused_in_one_sentence():
    for argv in (["--info"], ["--cfg", "hydra"], ["-cn", "other"], ["--config-path", "x"]):
        message = refusal("plan", argv)
        assert len(message.splitlines()) == 1 and ("not an option" in message or "not supported" in message)


def test_required_settings_and_non_overrides_are_named():
    assert refusal("checkpoint", ["src=a"]).startswith("error: out= is required; usage: python -m picollm.checkpoint")
    assert refusal("checkpoint", ["a", "b"]).startswith("error: argument 'a' is not key=value; usage:")
    assert refusal("sample", ["~device"]) == ("error: ~device would delete a setting of python -m picollm.sample; "
                                             "leave it out for its default.")


def test_a_setting_named_like_a_config_group_is_a_value(capsys):
    with pytest.raises(SystemExit):
        main_of("export")(["--cfg", "job", "run_dir=r", "out=o", "tokenizer=false"])  # tokenizer: also a group
    assert OmegaConf.create(capsys.readouterr().out).tokenizer is False


def test_quoted_free_text_reaches_the_command_as_typed():
    from picollm.sample import USAGE, SampleArgs
    for typed, prompt in (("prompt='def f(x): '", "def f(x): "), ('prompt="a, b (c)"', "a, b (c)"),
                          ("prompt=plain words", "plain words")):
        assert cli.parse(["run_dir=r", typed], "sample", USAGE, SampleArgs).prompt == prompt
    message = refusal("sample", ["run_dir=r", "prompt=def f(x):"])  # unquoted parentheses
    assert message.startswith("error: could not read 'prompt=def f(x):' (") and "prompt='\"def f(x):\"'" in message
    args = cli.parse(["run_dir=r", "prompt=x", "top_k=null"], "sample", USAGE, SampleArgs)
    assert args.top_k is None and cli.given(args, "top_k") and not cli.given(args, "max_tokens")


def test_report_compare_is_a_subcommand_with_its_own_settings(capsys, tmp_path):
    from picollm import report
    with pytest.raises(SystemExit):
        report.main(["compare", "--help"])
    assert "runs" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        report.main(["compare", "--cfg", "job", f"runs=[{tmp_path / 'a'},{tmp_path / 'b'}]"])
    assert OmegaConf.create(capsys.readouterr().out).runs == [str(tmp_path / "a"), str(tmp_path / "b")]


# ----------------------------------------------------------------------------- train's multirun

def test_multirun_points_get_named_sibling_dirs_and_are_all_checked_first(tmp_path, capsys):
    argv = ["-m", "model=tiny", f"run_dir={tmp_path}", "train.seed=range(1,3)", "train.lr=1e-3,2e-3"]
    with pytest.raises(SystemExit):
        main_of("train")(argv + ["--cfg", "job"])
    out = capsys.readouterr().out
    dirs = [line.split("run_dir=")[1] for line in out.splitlines() if line.startswith("# multirun point")]
    assert dirs == [str(tmp_path / name) for name in ("train.seed-1_train.lr-0.001", "train.seed-1_train.lr-0.002",
                                                      "train.seed-2_train.lr-0.001", "train.seed-2_train.lr-0.002")]
    # One bad point stops everything before the first run starts.
    assert "must be at least 1" in refusal("train", ["-m", f"run_dir={tmp_path}", "train.steps=2,0"])
    assert list(tmp_path.iterdir()) == []
    assert "run_dir cannot be swept" in refusal("train", ["-m", f"run_dir={tmp_path / 'a'},{tmp_path / 'b'}"])


def test_multirun_without_run_dir_shares_a_parent_named_from_the_command(capsys):
    with pytest.raises(SystemExit):
        main_of("train")(["-m", "--cfg", "job", "model=tiny", "train.seed=1,2"])
    dirs = [line.split("run_dir=")[1] for line in capsys.readouterr().out.splitlines() if line.startswith("# multirun")]
    assert len(dirs) == 2 and Path(dirs[0]).parent == Path(dirs[1]).parent
    assert Path(dirs[0]).parent.name.startswith("multirun-") and Path(dirs[0]).name == "train.seed-1"


@pytest.mark.slow  # two tiny trainings, one after the other
def test_train_multirun_trains_each_point_into_its_own_dir(tmp_path):
    main_of("train")(["-m", *TINY, "train.steps=2", "train.batch_tokens=128", "train.warmup_steps=1",
                      f"run_dir={tmp_path}", "train.seed=1,2"])
    for seed in (1, 2):
        run_dir = tmp_path / f"train.seed-{seed}"
        assert json.loads((run_dir / "final.json").read_text())["steps"] == 2
        assert OmegaConf.load(run_dir / "config.yaml").train.seed == seed
