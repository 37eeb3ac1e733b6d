"""docs/reproducing.md's commands are ones the CLI accepts, and run the paper's tables as the paper ran them:
two runs per row (Tables 1, 2, 6: `--repeats 2`), Noisy Student's per-class balancing for Table 4's pseudo-labels,
the 101-way CIFAR-100 head of Table 5."""

import re
import shlex

import pytest

from engine_toy import REPO
from rs_transfer.cli import build_parser

DOC = REPO / "docs" / "reproducing.md"


def doc_commands() -> list[list[str]]:
    """The argv (after `rs-transfer`, or `torchrun ... -m rs_transfer`) of every command in the doc's bash blocks:
    continued lines joined, comments and redirections dropped, `...` (the doc's "and the rest") left out."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", DOC.read_text(encoding="utf-8"), flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            for operator in (">", "|", "&&", ";"):  # the command ends where the shell's redirection or next one starts
                words = words[:words.index(operator)] if operator in words else words
            words = [word for word in words if word != "..."]
            if words[:1] == ["rs-transfer"]:
                commands.append(words[1:])
            elif words[:1] == ["torchrun"]:
                commands.append(words[words.index("rs_transfer") + 1:])
    return commands


def test_every_command_of_reproducing_md_parses():
    commands = doc_commands()
    assert len(commands) > 20
    for argv in commands:
        # a shell variable stands for a number here (--point $SLURM_ARRAY_TASK_ID)
        argv = ["0" if word.startswith("$") else word for word in argv]
        try:
            args, extra = build_parser().parse_known_args(argv)
        except SystemExit:
            pytest.fail(f"docs/reproducing.md: `{shlex.join(argv)}` is refused by the CLI")
        assert all("=" in item for item in extra), (argv, extra)


def test_reproducing_md_runs_the_tables_as_the_paper_did():
    commands = doc_commands()
    ladders = [argv for argv in commands if argv[:2] in (["reproduce", "table1"], ["reproduce", "table2"],
                                                         ["reproduce", "table6"])]
    assert ladders and all("--repeats" in argv and argv[argv.index("--repeats") + 1] == "2" for argv in ladders), \
        [shlex.join(argv) for argv in ladders if "--repeats" not in argv]
    [pseudo] = [argv for argv in commands if argv[:1] == ["pseudo-label"]]
    assert pseudo[pseudo.index("--per-class") + 1] == "130000"  # Noisy Student's balancing (Table 4)
    [cifar] = [argv for argv in commands if argv[:1] == ["sweep"] and "cifar100" in argv]
    assert {"model.num_classes=101", "task.background_class=true"} <= set(cifar)  # Table 5's 101-way head
