"""README.md and docs/ stay true to the repository and the CLI.

- Every relative link (`[text](target)` and images) resolves to a file or folder of the repository;
  a bare `#anchor` must match a heading of the same file, `page.md#anchor` a heading of that page
  (GitHub's slug rule).
- Every `nnslim ...` command line shown in a shell code block (bash, sh, shell, console or
  unlabelled) parses with the real click CLI: unknown options, wrong arity, missing required
  values, bad choices and out-of-range numbers fail. Paths need not exist.
"""

from __future__ import annotations

import re
import shlex
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import click
import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]

SHELL_BLOCKS = {"", "bash", "sh", "shell", "console"}
FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})\s*([^\s`]*)")
# [text](target) and ![alt](target); text may hold one level of brackets and span lines
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^()\s<>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
INLINE_CODE = re.compile(r"(`+)(?:.|\n)+?\1")
HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
SEPARATORS = {"|", "||", "&&", ";", "&", "(", ")"}
REDIRECTS = {">", ">>", "<", "2>", "&>"}
WRAPPERS = {"torchrun", "time", "nohup", "env", "exec", "sudo", "xargs"}


def _rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


# --------------------------------------------------------------------------------------- markdown


@dataclass
class Block:
    lang: str
    lines: list[tuple[int, str]]  # (1-based line number, text)


def split_markdown(text: str) -> tuple[str, list[Block]]:
    """The prose (code-block lines blanked, so line numbers stay) and the fenced code blocks."""
    prose, blocks, fence, block = [], [], None, None
    for number, line in enumerate(text.splitlines(), 1):
        match = FENCE.match(line)
        if fence is None and match:
            fence, block = match.group(1), Block(match.group(2).lower(), [])
            prose.append("")
        elif fence is not None and line.strip().startswith(fence[0] * len(fence)) and not line.strip().strip(fence[0]):
            blocks.append(block)
            fence, block = None, None
            prose.append("")
        elif fence is not None:
            block.lines.append((number, line))
            prose.append("")
        else:
            prose.append(line)
    if block is not None:
        blocks.append(block)
    return "\n".join(prose), blocks


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: rendered text, lower case, punctuation dropped, spaces to '-'."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # links and images: their text
    text = re.sub(r"<[^>]+>", "", text).replace("`", "")
    text = re.sub(r"(\*\*|__|\*)", "", text)
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    prose, _ = split_markdown(path.read_text())
    seen: Counter[str] = Counter()
    result = set()
    for line in prose.splitlines():
        match = HEADING.match(line)
        if match:
            base = slug(match.group(2))
            result.add(base if not seen[base] else f"{base}-{seen[base]}")
            seen[base] += 1
    return result


def links(text: str) -> list[tuple[int, str]]:
    """(line, target) of every markdown link and image outside code."""
    prose, _ = split_markdown(text)
    prose = INLINE_CODE.sub(lambda m: re.sub(r"[^\n]", " ", m.group(0)), prose)
    return [(prose.count("\n", 0, m.start()) + 1, m.group(1)) for m in LINK.finditer(prose)]


def link_problem(doc: Path, target: str) -> str | None:
    """Why a link target of `doc` does not resolve, or None."""
    if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target):  # http:, https:, mailto:, ...
        return None
    path_part, _, anchor = target.partition("#")
    if not path_part:
        return None if anchor in anchors(doc) else f"no heading '#{anchor}' in {_rel(doc)}"
    resolved = (doc.parent / path_part).resolve()
    if not resolved.is_relative_to(ROOT):
        return "points outside the repository"
    if not resolved.exists():
        return "no such file or folder"
    if anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
        return f"no heading '#{anchor}' in {_rel(resolved)}"
    return None


# ------------------------------------------------------------------------------------- commands


def command_lines(block: Block) -> list[tuple[int, str]]:
    """Logical lines of a shell block: continuation lines joined, a leading `$ ` prompt dropped."""
    result, pending, start = [], "", None
    for number, line in block.lines:
        start = number if start is None else start
        stripped = line.rstrip()
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        logical = (pending + stripped).strip()
        if logical.startswith("$ ") or logical == "$":
            logical = logical[1:].strip()
        result.append((start, logical))
        pending, start = "", None
    if pending:
        result.append((start, pending.strip()))
    return result


def nnslim_invocations(line: str) -> list[list[str]]:
    """The argument lists of every `nnslim` run on a shell line (also in pipelines, after `&&`, ...)."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    lexer.commenters = "#"
    tokens = list(lexer)
    segments, current = [], []
    for token in tokens:
        if token in SEPARATORS:
            segments.append(current)
            current = []
        else:
            current.append(token)
    segments.append(current)
    found = []
    for segment in segments:
        words, skip = [], False
        for token in segment:  # drop redirections and their targets
            if skip:
                skip = False
            elif token in REDIRECTS:
                skip = True
            else:
                words.append(token)
        while words and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", words[0]):  # VAR=value prefixes
            words.pop(0)
        if not words:
            continue
        head = Path(words[0]).name
        if head == "nnslim":
            found.append(words[1:])
        elif head in WRAPPERS:
            at = next((i for i, w in enumerate(words) if Path(w).name == "nnslim"), None)
            if at is not None:
                found.append(words[at + 1:])
        elif head.startswith("python") and words[1:3] == ["-m", "nnslim"]:
            found.append(words[3:])
    return found


UNSET = getattr(click.core, "UNSET", None)  # click >= 8.3 marks values not given with a sentinel


def _flat(value) -> list:
    if isinstance(value, (list, tuple)):
        return [v for item in value for v in _flat(item)]
    return [] if value is None or (UNSET is not None and value is UNSET) else [value]


def _typed(param: click.Parameter) -> bool:
    kind = param.type
    return isinstance(kind, (click.Choice, click.types.IntParamType, click.types.FloatParamType))


def _expanded_args(command: click.Command, ctx: click.Context, args: list[str]) -> list[str]:
    """The arguments as the command's own `parse_args` hands them to click (some commands expand
    `--folds 0 1 2` into repeated options first)."""
    captured: dict[str, list[str]] = {}

    def capture(self, ctx, args):
        captured["args"] = list(args)
        return []

    with mock.patch.object(click.Command, "parse_args", capture):
        command.parse_args(ctx, list(args))
    return captured.get("args", list(args))


def command_problem(args: list[str]) -> str | None:
    """Why `nnslim ARGS` would not parse with the real CLI, or None."""
    from nnslim.compiler.cli import cli

    command, name = cli, "nnslim"
    while True:
        ctx = click.Context(command, info_name=name)
        if not isinstance(command, click.Group):
            args = _expanded_args(command, ctx, args)
        parser = command.make_parser(ctx)
        try:
            values, rest, _ = parser.parse_args(list(args))
        except click.UsageError as exc:
            return f"{name}: {exc.format_message()}"
        params = {p.name: p for p in command.get_params(ctx)}
        if any(params[k].is_eager and values.get(k) for k in values if k in params):  # --help, --version
            return None
        for key, value in values.items():
            param = params.get(key)
            if param is None or getattr(param, "is_flag", False) or getattr(param, "count", False) or not _typed(param):
                continue
            for item in _flat(value):
                if isinstance(item, str) and item.startswith("$"):  # a shell variable: its value is unknown here
                    continue
                try:
                    param.type.convert(item, param, ctx)
                except click.UsageError as exc:
                    return f"{name}: {param.opts[0] if param.opts else key}: {exc.format_message()}"
        for param in params.values():
            if param.required and not _flat(values.get(param.name)):
                what = f"argument {param.human_readable_name}" if isinstance(param, click.Argument) else \
                    f"option {param.opts[0]}"
                return f"{name}: missing {what}"
        if isinstance(command, click.Group):
            if not rest:
                return f"{name}: no command given"
            sub = command.get_command(ctx, rest[0])
            if sub is None:
                return f"{name}: no such command {rest[0]!r}"
            command, name, args = sub, f"{name} {rest[0]}", rest[1:]
            continue
        if rest:
            return f"{name}: unexpected extra arguments {rest}"
        return None


def command_failures(doc: Path, text: str | None = None) -> tuple[int, list[str]]:
    """How many `nnslim` commands a page shows in shell blocks, and each that fails (file:line: why)."""
    text = doc.read_text() if text is None else text
    _, blocks = split_markdown(text)
    count, failures = 0, []
    for block in blocks:
        if block.lang not in SHELL_BLOCKS:
            continue
        for number, line in command_lines(block):
            try:
                invocations = nnslim_invocations(line)
            except ValueError as exc:  # unbalanced quotes
                if re.search(r"\bnnslim\b", line):
                    failures.append(f"{_rel(doc)}:{number}: cannot split {line!r}: {exc}")
                continue
            for args in invocations:
                count += 1
                problem = command_problem(args)
                if problem:
                    failures.append(f"{_rel(doc)}:{number}: {line}\n    -> {problem}")
    return count, failures


# ----------------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("doc", DOCS, ids=_rel)
def test_relative_links_resolve(doc):
    broken = [f"{_rel(doc)}:{line}: ({target}) {problem}"
              for line, target in links(doc.read_text()) if (problem := link_problem(doc, target))]
    assert not broken, "broken links:\n" + "\n".join(broken)


@pytest.mark.parametrize("doc", DOCS, ids=_rel)
def test_nnslim_commands_parse(doc):
    _, failures = command_failures(doc)
    assert not failures, "commands that the CLI would refuse:\n" + "\n".join(failures)


def test_the_readme_shows_commands_and_the_test_command():
    text = (ROOT / "README.md").read_text()
    count, _ = command_failures(ROOT / "README.md")
    assert count >= 5, f"only {count} nnslim commands found in README.md's code blocks"
    assert "bash scripts/test.sh" in text and "bash scripts/demo.sh" in text


def test_docs_folder_is_linked_from_the_readme():
    readme = ROOT / "README.md"
    targets = {(readme.parent / t.partition("#")[0]).resolve() for _, t in links(readme.read_text()) if t.partition("#")[0]}
    unlinked = [_rel(p) for p in DOCS[1:] if p.parent == ROOT / "docs" and p.resolve() not in targets]
    assert not unlinked, f"docs pages the README does not link: {unlinked}"


# ----------------------------------------------------------------------------- the checker itself


def test_checker_refuses_a_made_up_option(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# Page\n\n```bash\nnnslim infer engines/m scan.nii.gz \\\n    -o seg.nii.gz --made-up-option 3\n```\n")
    with mock.patch(f"{__name__}.ROOT", tmp_path):
        count, failures = command_failures(page)
    assert count == 1
    assert len(failures) == 1 and failures[0].startswith("page.md:4:") and "--made-up-option" in failures[0], failures


@pytest.mark.parametrize("command, expected", [
    ("nnslim infer e scan.nii.gz -o seg.nii.gz --skip sometimes", "--skip"),  # not a choice
    ("nnslim infer e scan.nii.gz -o seg.nii.gz --step 1.5", "--step"),  # out of range
    ("nnslim infer e scan.nii.gz -o seg.nii.gz --io-workers many", "--io-workers"),  # not a number
    ("nnslim build-engine m.pt --out e --patch 96 96", "--patch"),  # wrong arity
    ("nnslim build-engine m.pt", "--out"),  # a required option missing
    ("nnslim infer e -o seg.nii.gz", "INPUTS"),  # a required argument missing
    ("nnslim evaluate a.nii.gz b.nii.gz c.nii.gz", "extra"),  # too many arguments
    ("nnslim segment e scan.nii.gz", "segment"),  # no such command
    ("nnslim --made-up infer e scan.nii.gz -o seg.nii.gz", "--made-up"),  # unknown group option
])
def test_checker_refuses_bad_commands(command, expected):
    (args,) = nnslim_invocations(command)
    problem = command_problem(args)
    assert problem and expected in problem, problem


@pytest.mark.parametrize("line", [
    "nnslim infer engines/m scans/ -o segs/ --continue --num-parts 4 --part-id 0  # a comment",
    "nnslim -v build-engine nnUNet_results/D/T__P__3d_fullres --out engines/d --folds 0 1 2 3 4",
    "nnslim build-engine d --out engines/d --folds 0,1,2 --patch 96 96 96 --precision int8",
    "nnslim infer --help",
    "nnslim --version",
])
def test_checker_accepts_good_commands(line):
    (args,) = nnslim_invocations(line)
    assert command_problem(args) is None


def test_checker_finds_commands_in_pipelines_and_wrappers():
    line = "cd /data && NNSLIM_CACHE=/tmp/c nnslim inspect e | tee out.txt; torchrun --nproc_per_node 2 .venv/bin/nnslim train --help"
    assert nnslim_invocations(line) == [["inspect", "e"], ["train", "--help"]]
    assert nnslim_invocations("pip install nnslim") == []


def test_checker_reports_file_and_line(tmp_path):
    page = tmp_path / "docs_page.md"
    page.write_text("# Title\n\n```console\n$ nnslim inspect e\n$ nnslim infer e s.nii.gz -o o.nii.gz --nope\n```\n"
                    "\n```python\nnnslim --not-checked\n```\n")
    with mock.patch(f"{__name__}.ROOT", tmp_path):
        count, failures = command_failures(page)
    assert count == 2
    assert len(failures) == 1 and failures[0].startswith("docs_page.md:5:") and "--nope" in failures[0]


def test_link_checker_finds_broken_links_and_anchors(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text("# A page\n\n## Some `code` & more\n")
    page = tmp_path / "README.md"
    page.write_text("# Title\n\n## Second heading\n\nSee [a](docs/a.md#some-code--more), [b](#second-heading),\n"
                    "[gone](docs/missing.md), [anchor](#no-such), ![img](docs/a.md),\n[web](https://example.com) "
                    "and `[not a link](nowhere.md)`.\n\n```\n[in code](nowhere.md)\n```\n")
    with mock.patch(f"{__name__}.ROOT", tmp_path):
        found = [(line, target, link_problem(page, target)) for line, target in links(page.read_text())]
    problems = [(line, target) for line, target, problem in found if problem]
    assert problems == [(6, "docs/missing.md"), (6, "#no-such")]
    assert len(found) == 6


def test_slug_follows_github():
    assert slug("Folders at scale: `--num-parts`, exit codes") == "folders-at-scale---num-parts-exit-codes"
    assert slug("GPU: TensorRT, ONNX Runtime CUDA, Triton") == "gpu-tensorrt-onnx-runtime-cuda-triton"
    assert slug("Seeds 002 / 004") == "seeds-002--004"
