from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import pytest

from rs_transfer.config import ConfigError, RunConfig, load_config, save_config


def _write(path, text):
    path.write_text(text)
    return path


def test_defaults_yaml_and_overrides_stack(tmp_path):
    base = _write(tmp_path / "base.yaml", "model:\n  name: rs101\ntrain:\n  batch_size: 64\n  epochs: 10\n")
    child = _write(tmp_path / "child.yaml", "base: base.yaml\ntrain:\n  epochs: 3\n")
    config = load_config(RunConfig, child, ["seed=7", "model.drop_rate=0.25", "data.root=/data/x"])
    assert config.model.name == "rs101"  # from the base file
    assert config.train.batch_size == 64 and config.train.epochs == 3  # the child only lists its difference
    assert config.seed == 7 and config.model.drop_rate == 0.25 and config.data.root == "/data/x"
    assert config.model.num_classes is None  # dataclass default: inferred from the data
    assert load_config(RunConfig, base).train.epochs == 10


@pytest.mark.parametrize("override,message", [
    ("trian.epochs=3", "unknown key 'trian'; did you mean 'train'?"),
    ("train.epoch=3", "unknown key 'train.epoch'; did you mean 'train.epochs'?"),
    ("model.nmae=rs50", "did you mean 'model.name'?"),
    ("train.batch_size=many", "key 'train.batch_size'"),
    ("seed", "expected key=value"),
    ("=3", "expected key=value"),
])
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError) as error:
        load_config(RunConfig, None, [override])
    assert message in str(error.value)


def test_unknown_key_without_close_match_lists_valid_keys():
    with pytest.raises(ConfigError, match="valid keys here: epochs, steps, batch_size"):
        load_config(RunConfig, None, ["train.zzzzzz=1"])


def test_bad_files_are_named(tmp_path):
    with pytest.raises(ConfigError, match="config file not found: .*missing.yaml"):
        load_config(RunConfig, tmp_path / "missing.yaml")
    typo = _write(tmp_path / "typo.yaml", "model:\n  nam: rs50\n")
    with pytest.raises(ConfigError, match=r"config file .*typo.yaml: unknown key 'model.nam'; did you mean 'model.name'"):
        load_config(RunConfig, typo)
    broken = _write(tmp_path / "broken.yaml", "model: [1, 2\n")
    with pytest.raises(ConfigError, match="broken.yaml is not valid YAML"):
        load_config(RunConfig, broken)
    listing = _write(tmp_path / "list.yaml", "- a\n- b\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(RunConfig, listing)
    loop = _write(tmp_path / "loop.yaml", "base: loop.yaml\nseed: 1\n")
    with pytest.raises(ConfigError, match="includes itself"):
        load_config(RunConfig, loop)
    orphan = _write(tmp_path / "orphan.yaml", "base: nowhere.yaml\n")
    with pytest.raises(ConfigError, match="config file not found: .*nowhere.yaml"):
        load_config(RunConfig, orphan)


@dataclass
class HeadConfig:
    channels: int = 256


@dataclass
class TaskConfig(RunConfig):
    head: HeadConfig = field(default_factory=HeadConfig)


def test_task_schemas_extend_the_run_config():
    config = load_config(TaskConfig, None, ["head.channels=64", "model.name=rs26"])
    assert config.head.channels == 64 and config.model.name == "rs26"
    with pytest.raises(ConfigError, match="did you mean 'head.channels'"):
        load_config(TaskConfig, None, ["head.chanels=64"])


def test_saved_config_round_trips_with_commit(tmp_path):
    config = load_config(RunConfig, None, ["model.name=rs152", "train.steps=100", "output_dir=" + str(tmp_path)])
    path = save_config(config, tmp_path / "run")
    assert path == tmp_path / "run" / "config.yaml"
    assert path.read_text().startswith("# rs-transfer run config; git commit: ")
    assert load_config(RunConfig, path) == config



def test_a_key_added_to_the_schema_after_a_run_was_saved_matches_at_its_default():
    # A sweep point or checkpoint saved before `train.report_best` existed behaved as its default (false): it is
    # still the same run, so a finished point is reused and a checkpoint resumes; set to true it is another run.
    from rs_transfer.config import RunConfig, run_differences, to_dict

    config = RunConfig()
    saved = to_dict(config)
    del saved["train"]["report_best"]
    defaults = to_dict(RunConfig())
    assert run_differences(saved, to_dict(config), defaults=defaults) == []
    config.train.report_best = True
    assert run_differences(saved, to_dict(config), defaults=defaults) == ["train.report_best: None in the checkpoint, True now"]
    config.train.report_best = False
    assert run_differences(saved, to_dict(config)) == ["train.report_best: None in the checkpoint, False now"]  # no defaults given


BOMB = "".join(f"{name}: &{name} [{', '.join([f'*{prev}'] * 10 if prev else ['lol'] * 10)}]\n"
               for prev, name in zip(["", "a", "b", "c", "d", "e", "f", "g"], "abcdefgh"))


FLOW_BOMB = "[" + ", ".join(["[" + ", ".join(["[" + ", ".join(["x"] * 50) + "]"] * 50) + "]"] * 50) + "]"


@pytest.mark.parametrize("text, message", [
    (BOMB, "more than 100000 values once its aliases"),  # billion laughs: 10^8 values, a few hundred bytes
    ("model: " + "[" * 2000 + "]" * 2000 + "\n", "nested too deeply"),
    ("model:\n" + "".join("  " * i + f"k{i}:\n" for i in range(1, 40)), "nested more than 32 levels deep"),
    ("seed: " + "1" * (1 << 20) + "\n", "larger than 1 MiB"),
    ("seed: " + "1" * 5000 + "\n", "is not valid YAML: .*Exceeds the limit"),
    # a second section of the same name silently replaced the first (YAML keeps the last)
    ("train:\n  lr: 0.1\nseed: 1\ntrain:\n  epochs: 2\n", "has key 'train' twice \\(lines 1 and 4\\)"),
])
def test_yaml_bombs_and_abysses_are_one_error_naming_the_file(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=rf"config file {path} .*{message}"):
        load_config(RunConfig, path)


@pytest.mark.parametrize("value, message", [
    (FLOW_BOMB, "more than 100000 values"), ("[" * 2000 + "]" * 2000, "nested too deeply"),
    ("1" * 5000, "Exceeds the limit"),
])
def test_an_override_is_bounded_like_a_file(value, message):
    with pytest.raises(ConfigError, match=rf"override 'seed=.{{72}}\.\.\.'.*{message}"):  # the value shown cut short
        load_config(RunConfig, None, [f"seed={value}"])


@pytest.mark.parametrize("where", ["file", "override"])
def test_python_tags_are_refused_in_files_and_overrides_alike(tmp_path, where):
    value = "!!python/object/apply:os.system ['touch owned']"
    path = tmp_path / "tag.yaml"
    path.write_text(f"output_dir: {value}\n")
    with pytest.raises(ConfigError, match="could not determine a constructor for the tag"):
        load_config(RunConfig, path) if where == "file" else load_config(RunConfig, None, [f"output_dir={value}"])
    assert not (tmp_path / "owned").exists()


def test_values_are_literal_text_never_interpolated(tmp_path, monkeypatch):
    from rs_transfer.config import string_override

    monkeypatch.setenv("X", "expanded")
    path = tmp_path / "run.yaml"
    path.write_text("output_dir: runs/${oc.env:X}\n")
    assert load_config(RunConfig, path).output_dir == "runs/${oc.env:X}"
    for item in ("output_dir=S${oc.env:X}", string_override("output_dir", "S${oc.env:X}"), "output_dir=${seed}"):
        assert load_config(RunConfig, None, [item]).output_dir == item.split("=", 1)[1].strip("'")
    saved = save_config(load_config(RunConfig, None, ["output_dir=S${oc.env:X}"]), tmp_path / "out")
    assert load_config(RunConfig, saved).output_dir == "S${oc.env:X}"  # a run's config.yaml reads back the same


@pytest.mark.parametrize("item", ["output_dir='a\nb'", "output_dir=a\tb", "data.root=/data/\x00x"])
def test_a_control_character_in_a_value_is_refused_not_folded(item):
    # YAML folds a newline inside quotes into a space: the run would have trained into another folder
    with pytest.raises(ConfigError, match="control character"):
        load_config(RunConfig, None, [item])


def test_a_control_character_from_a_file_is_refused_naming_the_key(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text('output_dir: "runs/a\\nb"\n')
    with pytest.raises(ConfigError, match=r"output_dir='runs/a\\nb' holds a control character"):
        load_config(RunConfig, path)


def test_a_backslash_before_an_interpolation_keeps_it_literal_too(monkeypatch):
    # OmegaConf reads \\ before ${ as a backslash and then interpolates: i\${oc.env:HOME} wrote into i\/root
    monkeypatch.setenv("X", "expanded")
    for value in ("i\\${oc.env:X}", "i\\\\${oc.env:X}", "\\${seed}", "a\\b${x}"):
        assert load_config(RunConfig, None, [f"output_dir={value}"]).output_dir == value


@pytest.mark.parametrize("text, where, message", [
    ("train: {null: 1}\n", "file", "Incompatible key type 'NoneType'"),
    ("a." * 100 + "b=1", "override", "nested more than 32 levels deep"),
    ("seed=99999999999999999999", "override", "seed=99999999999999999999 makes no sense here: it must be <= 4294967295"),
    ("train.warmup_epochs=1e300", "override", "it must be <= 1000000"),
    ("model.num_classes=1000000000", "override", "it must be <= 100000"),
])
def test_odd_keys_and_absurd_numbers_are_one_error_not_a_traceback(tmp_path, text, where, message):
    path = tmp_path / "odd.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(RunConfig, path) if where == "file" else load_config(RunConfig, None, [text])


@pytest.mark.parametrize("task, override", [
    ("nyu_depth", "task.tta_scales=[abc]"), ("pascal_seg", "task.tta_scales=[nan]"),
    ("pascal_det", "task.tta_scales=[null]"), ("coco_det", "task.anchor_sizes=[[32],64]"),
    ("nyu_depth", "task.tta_scales=[true]"),
])
def test_items_of_an_untyped_list_must_be_numbers_where_a_range_is_checked(task, override):
    # Fields typed plain `list` get their items unconverted: a string, None, a list or a bool reached the range
    # check (TypeError: '>' not supported between 'str' and 'int', a traceback), or passed it as 1.
    from rs_transfer.downstream import finetune

    key = override.partition("=")[0]
    with pytest.raises(ConfigError, match=f"^{key}=.* makes no sense here: it must be a number > 0$"):
        finetune.make_config(task, overrides=[override])


def test_builders_write_inferred_keys_only_through_record_inferred():
    # A builder writes into a loaded config only the keys the data decides (INFERRED_KEYS), and only through
    # config.record_inferred: read from the source (ast), no assignment to such a key on anything but `self`
    import ast

    import rs_transfer
    from rs_transfer.config import INFERRED_KEYS

    leaves = {key.split(".")[1] for key in INFERRED_KEYS}
    writes = []
    for path in Path(rs_transfer.__file__).parent.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
            for target in filter(None, targets):
                for part in ast.walk(target):
                    if (isinstance(part, ast.Attribute) and part.attr in leaves and isinstance(part.ctx, ast.Store)
                            and ast.unparse(part.value) != "self"):
                        writes.append(f"{path.name}:{node.lineno} {ast.unparse(target)}")
    assert writes == []


def test_record_inferred_sets_an_inferred_key_and_refuses_any_other():
    from rs_transfer.config import ModelConfig, record_inferred

    config = SimpleNamespace(model=ModelConfig())
    record_inferred(config, "model.num_classes", 7)
    assert config.model.num_classes == 7
    with pytest.raises(ValueError, match="model.name is not a key inferred from the data"):
        record_inferred(config, "model.name", "rs50")
