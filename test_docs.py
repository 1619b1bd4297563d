"""The docs against the code: every command in the README's and docs/'s code blocks parses with its script's own
parser (so a renamed flag fails here, not in a reader's terminal), `-h` is short and figure-free, and the repo
speaks of the product only."""
import glob
import importlib
import os
import re
import shlex
import subprocess
import sys

import pytest

from conftest import HERE

DOCS = ["README.md", *sorted(glob.glob("docs/*.md", root_dir=HERE))]
# script -> how its command line is parsed, without running anything
PARSERS = {
    **{f"{m}.py": (lambda m: lambda argv: importlib.import_module(m).get_parser().parse_args(argv))(m)
       for m in ("vae", "gan", "ddpm", "evaluate", "bench")},
    "sample.py": lambda argv: importlib.import_module("sample").parse_args(argv),
    "tkinter_gui.py": lambda argv: importlib.import_module("tkinter_gui").get_parser().parse_args(argv),
}
SEPARATORS = {"&&", "||", ";", "|", "&"}
REDIRECTS = {">", ">>", "<", ">&", "&>", "<&", ">|"}
PREFIXES = {"nohup", "time", "env", "exec"}


def code_lines(path):
    """(line number, logical line) of every line inside the fenced code blocks of a Markdown file; a line ending in
    a backslash continues on the next, and is numbered by its first line."""
    out, fenced, pending = [], False, None
    with open(os.path.join(HERE, path), encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            line = line.rstrip("\n")
            if line.lstrip().startswith("```"):
                fenced, pending = not fenced, None
                continue
            if not fenced:
                continue
            if pending:
                pending = (pending[0], pending[1] + " " + line.strip())
            else:
                pending = (number, line.strip())
            if pending[1].endswith("\\"):
                pending = (pending[0], pending[1][:-1].rstrip())
                continue
            out.append(pending)
            pending = None
    return out


def commands(line):
    """The (script, argv) of each python/torchrun command in a shell line: chains (&&, ;, |, &) split, `cd`,
    `pip` and other commands dropped, env assignments, nohup and redirections stripped, comments ignored."""
    line = re.sub(r"(?<=\s)\d+(?=[<>])", "", line)  # file-descriptor numbers of redirections (2>&1)
    lex = shlex.shlex(line, posix=True, punctuation_chars=True)
    lex.whitespace_split = True
    try:
        tokens = list(lex)
    except ValueError:  # unbalanced quotes: not a shell line
        return []
    segments, words, skip = [], [], False
    for t in tokens:
        if skip:
            skip = False
        elif t in REDIRECTS:
            skip = True  # its target goes too
        elif t in SEPARATORS:
            segments.append(words)
            words = []
        else:
            words.append(t)
    segments.append(words)
    found = []
    for words in segments:
        while words and (words[0] in PREFIXES or re.fullmatch(r"[A-Za-z_]\w*=\S*", words[0])):
            words = words[1:]
        if not words:
            continue
        if words[0] in ("python", "python3") and len(words) > 1 and not words[1].startswith("-"):
            found.append((words[1], words[2:]))
        elif words[0] == "torchrun":  # torchrun's own flags, then the script
            at = next((i for i, w in enumerate(words) if w.endswith(".py")), None)
            if at is not None:
                found.append((words[at], words[at + 1:]))
    return found  # `python -m ...` (pytest) and `python -c` are not scripts of this repo


def documented_commands():
    cases = []
    for path in DOCS:
        for number, line in code_lines(path):
            known = [(script, argv) for script, argv in commands(line) if script in PARSERS]
            if known:
                cases.append(pytest.param(known, id=f"{path}:{number}"))
    return cases


@pytest.mark.parametrize("cmds", documented_commands())
def test_documented_command_parses(cmds, capsys):
    for script, argv in cmds:
        try:
            PARSERS[script](argv)
        except SystemExit as e:
            err = capsys.readouterr().err.strip().splitlines()
            pytest.fail(f"python {script} {shlex.join(argv)}: exit {e.code}: {err[-1] if err else ''}")


def test_the_command_finder_reads_shell_lines():
    assert commands("pip install -r requirements.txt && python vae.py --epochs 4 && python sample.py vae x.pt") == \
        [("vae.py", ["--epochs", "4"]), ("sample.py", ["vae", "x.pt"])]
    assert commands("cd GANji && OMP_NUM_THREADS=1 nohup python gan.py --epochs 19 > log.txt 2>&1 &  # 30 min") == \
        [("gan.py", ["--epochs", "19"])]
    assert commands("torchrun --standalone --nproc_per_node=8 ddpm.py --batch-size 256") == \
        [("ddpm.py", ["--batch-size", "256"])]
    assert commands("python -m pytest -q") == [] and commands("python scripts/run.py --x")[0][0] == "scripts/run.py"
    lines = code_lines("README.md")
    assert lines and all(not text.endswith("\\") for _, text in lines)


def test_a_renamed_flag_fails(capsys):
    with pytest.raises(SystemExit):
        PARSERS["gan.py"](["--epochs", "19", "--no-such-flag", "1"])


# ----------------------------------------------------------------------------------------------------
# -h

def help_text(*argv):
    env = {**os.environ, "COLUMNS": "80", "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, *argv, "-h"], cwd=HERE, capture_output=True, text=True, env=env,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    return res.stdout


def flag_help_lines(text):
    """{invocation: lines of help} for every entry of an argparse -h."""
    entries, current = {}, None
    for line in text.splitlines():
        if re.match(r"  \S", line):
            current, *first = re.split(r"\s{2,}", line.strip(), maxsplit=1)  # help may start on this line
            entries[current] = len(first)
        elif current and line.startswith("    ") and line.strip():
            entries[current] += 1
        else:
            current = None
    return entries


@pytest.mark.parametrize("script", ["gan.py", "vae.py", "ddpm.py", "sample.py"])
def test_help_is_short_and_has_no_figures(script):
    text = help_text(script)
    assert not [line for line in text.splitlines() if len(line) > 100]
    assert not re.search(r"FID\W{0,3}\d", text)
    entries = flag_help_lines(text)
    assert "--seed SEED" in entries
    assert {k: n for k, n in entries.items() if n > 2} == {}, "one or two lines a flag"


# ----------------------------------------------------------------------------------------------------
# The repo speaks of the product

def repo_text_files():
    files = ["README.md", *glob.glob("docs/*.md", root_dir=HERE), *glob.glob("*.py", root_dir=HERE),
             *glob.glob("scripts/**/*.py", root_dir=HERE, recursive=True)]
    return sorted(f for f in files if f != "test_docs.py")  # this file names what it looks for


ISSUE = re.compile(r"(?i)\b(?:issue|pull request|PR)s?\s*#?\d+|(?<![\"'&\w])#\d+\b")


def test_no_session_or_issue_numbers_in_the_repo():
    found = []
    for path in repo_text_files():
        with open(os.path.join(HERE, path), encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                rest = line.replace('scope="session"', "").replace("test session", "")  # pytest's own word
                if re.search(r"(?i)session", rest) or ISSUE.search(line):
                    found.append(f"{path}:{number}: {line.strip()}")
    assert not found
