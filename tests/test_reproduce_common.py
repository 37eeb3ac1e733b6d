"""The one table writer (rs_transfer/reproduce/common.py `write_table`): JSON, markdown and figures, each replaced
whole; a table that cannot be written leaves the previous one."""

import json

import pytest
from matplotlib.figure import Figure

from rs_transfer.files import FileWriteError
from rs_transfer.reproduce.common import write_table


def test_write_table_writes_json_md_and_figures_and_a_refused_table_keeps_the_previous_one(tmp_path):
    figure = Figure(figsize=(2, 2), dpi=50)
    figure.add_subplot().plot([0, 1], [1, 0])
    paths = write_table(tmp_path / "out", "table9", "# Table 9\n", {"rows": [1.5]}, {"plot.png": figure})
    assert [p.name for p in paths] == ["table9.json", "table9.md", "plot.png"]
    assert json.loads(paths[0].read_text()) == {"rows": [1.5]} and paths[1].read_text() == "# Table 9\n"
    assert paths[2].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(FileWriteError, match="not a finite number"):
        write_table(tmp_path / "out", "table9", "# changed\n", {"rows": [float("nan")]})
    assert json.loads(paths[0].read_text()) == {"rows": [1.5]} and paths[1].read_text() == "# Table 9\n"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["plot.png", "table9.json", "table9.md"]
