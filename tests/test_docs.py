"""The commands in README.md and docs/*.md do what the text says (issue 17).

Every command of a fenced shell block (```sh, ```bash, ```shell, ```console) is one of:
- run: an `edgemoe ...` / `python -m edgemoe ...` command as written, in a scratch directory holding
  the files the docs name (model.onnx with its config and tokenizer; MODEL, STORE, FILE for
  placeholders), with EDGEMOE_CACHE and XDG_CONFIG_HOME in that directory: exit 0 (or what the
  block shows) and what the text promises (PROMISES; the lines a ```console block shows under
  `$ command`);
- a synopsis (`[...]`, `a|b`, `...` or a placeholder that has no fixture): its subcommand exists and
  takes every option it shows, with the choices it shows;
- listed in SKIP, with the reason it cannot run here (installs, the test suite itself, long runs);
  a skipped `python SCRIPT` or `python -m pytest` still has its script and paths checked, and its
  options against the script's --help.
A command that is none of these fails the test: a new doc command is run, or listed with a reason.
Inline `edgemoe ...` spans of the prose and tables are checked as synopses.
"""

from __future__ import annotations

import argparse
import inspect
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELL_LANGS = {"sh", "bash", "shell", "console", "shell-session"}

# command text (as parsed: continuations joined, comment dropped, split at &&) -> why it is not run
SKIP = {
    "python3 -m pip install .": "installs the package (a network and a ~5 minute build); these tests run the checkout",
    'python3 -m pip install ".[dev]"': "installs the package and its test dependencies",
    "python3 -m pytest -q": "the whole test suite, of which this test is part",
    "python -m pytest -q -p no:warnings tests/test_onnx.py": "part of the test suite",
    "python -m pytest -q -p no:warnings tests/fuzz tests/test_hardening.py": "part of the test suite",
    "python tools/fuzz_long.py --hypothesis 5000": "long fuzzing: 5000 examples per hypothesis test",
    "python tools/fuzz_long.py --target all --examples 5000 --seed 1 --out fuzz-findings": "long fuzzing (hours)",
    "python tools/fuzz_long.py --target manifest-raw --examples 500": "500 forked children: about a minute here",
    "python tools/crash_convert.py --kills 200 --seed 1 -v": "200 killed conversions: minutes",
    "python tools/soak.py model --tokens 2000": "a soak: 2000 tokens, minutes",
    "python tools/soak.py server --rounds 20 --clients 4 --requests 5": "a soak of the server: minutes",
    "python tests/fuzz/make_seeds.py": "rewrites the seed files checked in under tests/fuzz",
}


@dataclass(frozen=True)
class DocCommand:
    where: str  # README.md:31
    text: str  # the command: continuations joined, comment dropped, one of a && chain
    comment: str  # the comment after it on its line
    output: tuple[str, ...] = ()  # ```console: the lines shown under `$ command`


# ---- reading the docs ---------------------------------------------------------------------------

FENCE = re.compile(r"^(?P<fence>```+|~~~+)[ \t]*(?P<lang>[\w+-]*)[^\n]*\n(?P<body>.*?)^(?P=fence)[ \t]*$", re.M | re.S)


def _split_comment(line: str) -> tuple[str, str]:
    """`cmd  # comment` -> (cmd, comment); a # inside quotes or a word is no comment."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip(), line[i + 1 :].strip()
    return line.rstrip(), ""


def _split_and(cmd: str) -> list[str]:
    """`a && b` -> [a, b] (outside quotes)."""
    parts, quote, start = [], None, 0
    for i, ch in enumerate(cmd):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif cmd.startswith("&&", i) and i >= start:
            parts.append(cmd[start:i])
            start = i + 2
    parts.append(cmd[start:])
    return [" ".join(p.split()) for p in parts if p.strip()]


def block_commands(body: str, lang: str, where: str) -> list[DocCommand]:
    """The commands of one fenced block; where is "FILE:LINE" of its first line."""
    doc, line0 = where.rsplit(":", 1)
    out: list[DocCommand] = []
    lines = body.splitlines()
    console = lang in ("console", "shell-session") or any(ln.startswith("$ ") for ln in lines)
    i = 0
    while i < len(lines):
        n, raw = i, lines[i]
        i += 1
        if console and not raw.startswith("$ "):
            if out and raw.strip():  # output of the command above
                last = out[-1]
                out[-1] = DocCommand(last.where, last.text, last.comment, (*last.output, raw.strip()))
            continue
        raw = raw[2:] if console else raw
        while raw.rstrip().endswith("\\") and i < len(lines):  # continuation lines
            raw = raw.rstrip()[:-1] + " " + lines[i].strip()
            i += 1
        cmd, comment = _split_comment(raw.strip())
        if raw[:1].isspace() and out and not console:  # an indented line goes on with the one above
            last = out[-1]
            text = f"{last.text} {cmd}" if cmd else last.text
            out[-1] = DocCommand(last.where, text, f"{last.comment} {comment}".strip(), last.output)
            continue
        for part in _split_and(cmd):
            out.append(DocCommand(f"{doc}:{int(line0) + n}", part, comment))
    return out


def doc_commands(docs=DOCS) -> list[DocCommand]:
    cmds = []
    for path in docs:
        text = path.read_text(encoding="utf-8")
        for m in FENCE.finditer(text):
            if m.group("lang").lower() in SHELL_LANGS:
                line = text[: m.start("body")].count("\n") + 1
                cmds += block_commands(m.group("body"), m.group("lang").lower(), f"{path.name}:{line}")
    return cmds


def inline_commands(docs=DOCS) -> list[DocCommand]:
    """`edgemoe ...` code spans of the prose and tables (a table's \\| is a |)."""
    out = []
    for path in docs:
        text = re.sub(FENCE, lambda m: "\n" * m.group(0).count("\n"), path.read_text(encoding="utf-8"))
        for m in re.finditer(r"`((?:python3? -m )?edgemoe [^`\n]+)`", text):
            line = text[: m.start()].count("\n") + 1
            out.append(DocCommand(f"{path.name}:{line}", m.group(1).replace("\\|", "|"), ""))
    return out


# ---- what a command is --------------------------------------------------------------------------

PLACEHOLDER = re.compile(r"[A-Z][A-Z0-9_]+(\.\w+)?")


def _unquoted(text: str) -> str:
    return re.sub(r"\"[^\"]*\"|'[^']*'", '""', text)


def edgemoe_args(text: str) -> list[str] | None:
    """The arguments after `edgemoe` / `python -m edgemoe`, or None for another command."""
    try:
        argv = shlex.split(text)
    except ValueError:
        return None
    if argv[:1] == ["edgemoe"]:
        return argv[1:]
    if len(argv) >= 3 and argv[0] in ("python", "python3") and argv[1:3] == ["-m", "edgemoe"]:
        return argv[3:]
    return None


def placeholders(text: str) -> set[str]:
    words = re.split(r"[\s=/]+", _unquoted(text))
    return {w for w in words if PLACEHOLDER.fullmatch(w)}


def is_synopsis(text: str, fixtures: set[str]) -> bool:
    """A usage line rather than a command: optional parts, alternatives, an ellipsis, or a
    placeholder the test has no file for."""
    bare = _unquoted(text)
    return any(s in bare for s in ("[", "|", "...")) or not placeholders(text) <= fixtures


FIXTURES = {"MODEL", "STORE", "FILE", "PROMPT"}  # what a placeholder stands for in the scratch dir


# ---- the CLI's options --------------------------------------------------------------------------


def _run(argv: list[str], cwd: Path | None = None, env: dict | None = None, timeout: float = 300):
    return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@cache
def _parser() -> argparse.ArgumentParser:
    from edgemoe.cli import build_parser

    return build_parser()


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    acts = [a for a in _parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(acts[0].choices)


@cache
def options_of(sub: str | None) -> dict[str, tuple | None]:
    """option string -> its choices (None: any value), for a subcommand (None: the top level). A
    subcommand with its own parser (bench) is read from its --help."""
    if sub is None:
        p = _parser()
    else:
        p = _subparsers()[sub]
        if not [a for a in p._actions if a.option_strings]:  # a stub: `edgemoe SUB --help` has the options
            text = _run([sys.executable, "-m", "edgemoe", sub, "--help"], cwd=ROOT, timeout=120).stdout
            return {o: None for o in re.findall(r"(?<![\w-])(--?[A-Za-z][\w-]*)", text)}
    return {o: (tuple(map(str, a.choices)) if a.choices else None) for a in p._actions for o in a.option_strings}


def synopsis_problems(text: str) -> list[str]:
    """What a usage line shows that the CLI does not take: an unknown subcommand, option or choice."""
    args = edgemoe_args(text.replace("[", " ").replace("]", " "))
    if args is None:
        return [f"not an edgemoe command: {text}"]
    if not args:
        return []
    sub = None if args[0].startswith("-") else args[0]
    if sub is not None and sub not in _subparsers():
        return [f"no subcommand {sub!r}"]
    opts, problems = options_of(sub), []
    rest = args[1:] if sub else args
    for i, tok in enumerate(rest):
        if tok == "--":  # what follows is another command (emulate)
            break
        flag = tok.split("=", 1)[0]
        if not re.fullmatch(r"--?[A-Za-z][\w-]*", flag):
            continue
        if flag not in opts:
            problems.append(f"`edgemoe {sub or ''}` has no option {flag}")
            continue
        value = tok.split("=", 1)[1] if "=" in tok else (rest[i + 1] if i + 1 < len(rest) else "")
        if opts[flag] and re.fullmatch(r"[a-z0-9_.]+(\|[a-z0-9_.]+)+", value):
            problems += [f"{flag} takes no {c!r} (choices {', '.join(opts[flag])})" for c in value.split("|")
                         if c not in opts[flag]]  # fmt: skip
    return problems


# ---- running them -------------------------------------------------------------------------------


def _text_out(p, sandbox):  # a completion streamed to stdout
    assert p.stdout.strip(), "no text on stdout"


def _converted_onnx(p, sandbox):  # like a GGUF: dense.gguf + nested expert shards
    store = sandbox / "model.edgemoe"
    assert p.stdout.strip().splitlines()[-1] == "model.edgemoe", p.stdout
    assert (store / "manifest.json").is_file() and (store / "dense.gguf").is_file()
    assert list(store.glob("experts-*.gguf")), "no expert shards"


def _ran_onnx(p, sandbox):  # a store beside the model, else converted once into the cache, then runs
    _text_out(p, sandbox)
    cached = [d for d in (sandbox / "cache" / "stores").glob("*") if d.is_dir()]
    assert bool(cached) != (sandbox / "model.edgemoe").is_dir(), f"stores in the cache: {cached}"


def _verified(p, sandbox):  # edgemoe verify: a clean store says OK
    assert ": OK (" in p.stdout, p.stdout


def _profiled(p, sandbox):  # writes the user's this-machine profile, says where and how to name it
    written = sandbox / "config" / "edgemoe" / "profiles" / "this-machine.yaml"
    assert written.is_file() and str(written) in p.stdout, p.stdout
    assert "--profile this-machine" in p.stdout, p.stdout


def _ran_with_profile(p, sandbox):  # the profile's default_budget is the budget: a store, streamed
    _text_out(p, sandbox)
    assert [d for d in (sandbox / "cache" / "stores").glob("*") if d.is_dir()], "no store: no budget was set"


PROMISES = {  # command text -> what the text around it says it does (beyond exit 0)
    'edgemoe run "ROMEO. What light through yonder window"': _text_out,
    "edgemoe convert model.onnx -o model.edgemoe": _converted_onnx,
    'edgemoe run -m model.onnx "Hello" -n 16': _ran_onnx,
    'edgemoe run -m model.edgemoe "Hello" -n 16': _text_out,
    "edgemoe verify STORE": _verified,
    "edgemoe profile --size 16MiB --mem-size 32MiB --no-kernels": _profiled,
    'edgemoe run --profile this-machine -n 16 --seed 1 "ROMEO."': _ran_with_profile,
}


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory) -> dict:
    """The files doc commands name: model.onnx (+ config.json, tokenizer.json), and for the
    placeholders a tiny GGUF (MODEL), its store (STORE) and a text file (FILE)."""
    from edgemoe.store.convert import convert
    from edgemoe.testing import synth

    d = tmp_path_factory.mktemp("doc-fixtures")
    spec = synth.SynthSpec.tiny("qwen3moe", n_embd=64, n_ff_exp=64, n_expert=8, n_layer=2)
    gguf = synth.write_model(spec, d / "tiny.gguf")
    files = {"MODEL": gguf, "STORE": convert(gguf, d / "tiny.edgemoe", progress=False), "PROMPT": "Hello"}
    (d / "text.txt").write_text("The quick brown fox jumps over the lazy dog. " * 40)
    files["FILE"] = d / "text.txt"
    try:
        sys.path.insert(0, str(ROOT / "tests"))
        from test_onnx import build_onnx

        files["onnx"] = build_onnx(spec, d / "onnx").parent
    except pytest.skip.Exception:  # without the [onnx] extra the ONNX commands cannot run
        files["onnx"] = None
    return files


def _sandbox(tmp_path: Path, fixtures: dict) -> tuple[Path, dict]:
    box = tmp_path / "box"
    box.mkdir()
    if fixtures.get("onnx"):
        for f in fixtures["onnx"].iterdir():
            (box / f.name).symlink_to(f)
    env = {
        **os.environ,
        "EDGEMOE_CACHE": str(box / "cache"),
        "XDG_CONFIG_HOME": str(box / "config"),
        "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]),
    }
    return box, env


def run_doc_command(c: DocCommand, box: Path, env: dict, fixtures: dict) -> str | None:
    """Run one command as the docs show it; what went wrong, or None."""
    args = edgemoe_args(c.text)
    assert args is not None
    subst = {k: str(v) for k, v in fixtures.items() if k in FIXTURES}
    args = ["/".join(subst.get(part, part) for part in a.split("/")) for a in args]
    if ("model.onnx" in args or "model.onnx" in c.text) and not fixtures.get("onnx"):
        return None  # no onnx extra here: test_onnx skips too
    try:
        p = _run([sys.executable, "-m", "edgemoe", *args], cwd=box, env=env)
    except subprocess.TimeoutExpired:
        return f"{c.where}: `{c.text}` ran past 300 s"
    want_rc = 2 if any(ln.startswith("edgemoe: error:") for ln in c.output) else 0
    if p.returncode != want_rc:
        return f"{c.where}: `{c.text}` exited {p.returncode}, not {want_rc}: {p.stderr.strip()[-600:]}"
    shown = p.stdout + p.stderr
    missing = [ln for ln in c.output if ln != "..." and ln not in shown]
    if missing:
        return f"{c.where}: `{c.text}` did not print {missing!r}; it printed {shown[-600:]!r}"
    check = PROMISES.get(c.text)
    if check is not None:
        try:
            check(p, box)
        except AssertionError as exc:
            return f"{c.where}: `{c.text}` ({c.comment or check.__name__}): {exc}"
    return None


def static_problems(c: DocCommand) -> list[str]:
    """A skipped python command still names files that exist and options its script takes."""
    try:
        argv = shlex.split(c.text)
    except ValueError as exc:
        return [f"{c.where}: `{c.text}`: {exc}"]
    if argv[0] not in ("python", "python3") or len(argv) < 2:
        return []
    if argv[1] == "-m":
        if argv[2:3] != ["pytest"]:
            return []
        paths = [a for a in argv[3:] if not a.startswith("-") and argv[argv.index(a) - 1] != "-p"]
        return [f"{c.where}: `{c.text}`: no {a}" for a in paths if not (ROOT / a.split("::")[0]).exists()]
    script = ROOT / argv[1]
    if not script.is_file():
        return [f"{c.where}: `{c.text}`: no script {argv[1]}"]
    flags = [a.split("=")[0] for a in argv[2:] if a.startswith("-")]
    if not flags or "argparse" not in script.read_text():
        return []
    words = [a for a in argv[2:] if not a.startswith("-")][:1]  # a subcommand (soak.py model)
    words = words if argv[2:3] == words else []
    text = _run([sys.executable, str(script), *words, "--help"], cwd=ROOT, timeout=120).stdout
    return [f"{c.where}: `{c.text}`: {argv[1]} has no option {f}" for f in flags if f not in text]


# ---- the tests ----------------------------------------------------------------------------------


def test_every_doc_command_is_run_checked_or_listed():
    """A command the docs show is run, a synopsis checked against the CLI, or listed in SKIP with a
    reason; SKIP lists nothing the docs no longer show."""
    cmds = doc_commands()
    assert cmds, "no shell blocks found: the parser is broken"
    unlisted = [
        f"{c.where}: `{c.text}`"
        for c in cmds
        if c.text not in SKIP and edgemoe_args(c.text) is None
    ]  # fmt: skip
    assert not unlisted, "doc commands neither run nor listed in tests/test_docs.py SKIP:\n" + "\n".join(unlisted)
    stale = (set(SKIP) | set(PROMISES)) - {c.text for c in cmds}
    assert not stale, f"SKIP or PROMISES name commands no doc shows any more: {sorted(stale)}"


def test_usage_lines_match_the_cli():
    """Every edgemoe command, synopsis and inline `edgemoe ...` span names a subcommand and options the
    CLI takes (in full: argparse would take an abbreviation); a skipped python command names files
    that exist and options its script takes."""
    problems = []
    usage = [c for c in doc_commands() if edgemoe_args(c.text) is not None]  # run ones too: options spelled out
    for c in usage + inline_commands():
        problems += [f"{c.where}: `{c.text}`: {p}" for p in synopsis_problems(c.text)]
    for c in doc_commands():
        if c.text in SKIP:
            problems += static_problems(c)
    assert not problems, "\n".join(problems)


def runnable(doc: Path) -> list[DocCommand]:
    return [
        c
        for c in doc_commands([doc])
        if c.text not in SKIP and edgemoe_args(c.text) is not None and not is_synopsis(c.text, FIXTURES)
    ]


RUNNABLE_DOCS = [d for d in DOCS if runnable(d)]


@pytest.mark.parametrize("doc", RUNNABLE_DOCS, ids=[d.name for d in RUNNABLE_DOCS])
def test_doc_commands_do_what_the_text_says(doc, fixtures, tmp_path):
    """Each doc's runnable commands, in order, in one scratch directory."""
    box, env = _sandbox(tmp_path, fixtures)
    todo = runnable(doc)
    problems = [p for c in todo if (p := run_doc_command(c, box, env, fixtures))]
    assert not problems, "\n".join(problems)


def test_api_defaults_in_docs_are_the_codes():
    """docs/api.md's load() argument table: every option of edgemoe.Model is there, and each
    "(default `X`)" is the signature's default."""
    import edgemoe

    text = (ROOT / "docs" / "api.md").read_text(encoding="utf-8")
    rows = {}
    for line in text.splitlines():
        m = re.match(r"\|\s*((?:`\w+`,?\s*)+)\|(.*)\|\s*$", line)
        if m:
            for name in re.findall(r"`(\w+)`", m.group(1)):
                rows.setdefault(name, m.group(2))
    params = inspect.signature(edgemoe.Model.__init__).parameters
    for name, prm in params.items():
        if name == "self":
            continue
        assert name in rows, f"docs/api.md's argument table has no row for {name}"
        d = re.search(r"\(default `([^`]+)`", rows[name])
        if d:
            assert d.group(1) == repr(prm.default), f"docs/api.md: {name} default `{d.group(1)}`, code {prm.default!r}"


def test_convert_help_names_the_inputs_the_readme_names():
    """The README's command table says what convert takes; its --help says the same."""
    row = next(c.text for c in inline_commands([ROOT / "README.md"]) if c.text.startswith("edgemoe convert "))
    help_text = " ".join(_run([sys.executable, "-m", "edgemoe", "convert", "--help"], cwd=ROOT).stdout.split())
    for kind, word in (("gguf", "GGUF"), ("onnx", "ONNX")):
        if f".{kind}" in row:
            assert word in help_text, f"README: `{row}`; convert --help: {help_text}"
