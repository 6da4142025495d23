"""Progress: a bar on a terminal, a line every tenth of the way otherwise (short CI and Prefect logs)."""

from __future__ import annotations

from flows.progress import progress


def test_plain_lines_every_tenth_and_at_the_end(capsys):
    show = progress("ingesting", interactive=False)
    for i in range(1, 38):
        show(i, 37)
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 10 and lines[-1].startswith("  ingesting: 37/37")


def test_a_bar_on_a_terminal_finishes_and_can_start_again(capsys):
    show = progress("rendering", interactive=True)
    for _ in range(2):
        for i in range(1, 6):
            show(i, 5)
    err = capsys.readouterr().err
    assert err.count("5/5") >= 2 and "rendering" in err
