"""rs_transfer/api.py: the README's "From Python" block runs exactly as written; overrides as dicts."""

import re
from pathlib import Path

from rs_transfer import api

README = Path(__file__).resolve().parents[1] / "README.md"


def test_the_readmes_python_block_runs_as_written(tmp_path, monkeypatch, capsys):
    section = README.read_text(encoding="utf-8").split("## From Python", 1)[1]
    block = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    exec(compile(block, "README.md (From Python)", "exec"), {})
    printed = capsys.readouterr().out.splitlines()
    assert re.fullmatch(r"top-1 \d\.\d{3}", printed[0]) and printed[1] == "12 images predicted"
    assert len(list((tmp_path / "runs" / "api_try" / "eval").glob("*.json"))) == 1


def test_overrides_as_a_dict_keep_strings_as_strings():
    assert api.overrides_list({"train.lr": 0.1, "model.weights": "timm:x", "task.tta_scales": [0.5, 1.0],
                               "train.compile": True}) == [
        "train.lr=0.1", "model.weights='timm:x'", "task.tta_scales=[0.5, 1.0]", "train.compile=true"]
    assert api.overrides_list(["train.lr=0.1"]) == ["train.lr=0.1"] and api.overrides_list(None) == []
