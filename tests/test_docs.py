"""The docs against the code: links, commands, flags and the README's set-up commands.

README.md is the front page and docs/*.md hold one topic each; benchmarks/README.md has the measured tables. These
tests read them as text (no network, no model) and fail when they drift from the repository:

- every relative link (and its #anchor) names a file and a heading that exist;
- every path the prose or a command names in this repository (`tests/...`, `configs/...`) exists, and so does
  every entry of the README's "Layout" tree;
- every `lerobot-xvla ...` command in a code block (or an inline code span) parses with lerobot-xvla's own parser;
- every `--policy.<field>` names a field of XVLAConfig, and every `--env.<field>` given with
  `--env.type=so101_reach` a field of SO101ReachEnvConfig;
- the README still holds the two set-up commands that CI runs, and links every docs page;
- every docs page opens with its title and a one-paragraph summary.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md")), ROOT / "benchmarks" / "README.md"]

# The README's Quick start: CI and newcomers run exactly these lines.
SETUP_COMMANDS = ("bash scripts/demo.sh", "bash scripts/test.sh")

FENCE = re.compile(r"^\s*(```+|~~~+)\s*([\w+-]*)")
SHELL_LANGUAGES = {"bash", "sh", "shell", "console", "zsh"}
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
CODE_SPAN = re.compile(r"(`+)(.+?)\1", re.DOTALL)
# Top-level folders and files of the repository that the docs name in code spans and commands.
REPO_PATH = re.compile(
    r"^(?:lerobot_xvla|lerobot_policy_xvla|tests|benchmarks|configs|scripts|docs|constraints)/[\w./*-]*[\w*]$"
)
COMMAND_PATH = re.compile(r"(?<![\w./<>-])((?:tests|benchmarks|configs|scripts)/[\w./-]+\.(?:py|sh|json))\b")
PLACEHOLDER = re.compile(r"<[^<>]+>")
POLICY_FLAG = re.compile(r"--policy\.([A-Za-z_]\w*)(\*)?")
ENV_FLAG = re.compile(r"--env\.([A-Za-z_]\w*)")


@dataclasses.dataclass
class Page:
    path: Path
    text: str
    prose: str  # the text outside fenced code blocks, code spans still in
    blocks: list[tuple[str, list[str]]]  # (language, lines) of each fenced code block

    @property
    def name(self) -> str:
        return str(self.path.relative_to(ROOT))


def _read(path: Path) -> Page:
    text = path.read_text(encoding="utf-8")
    prose: list[str] = []
    blocks: list[tuple[str, list[str]]] = []
    fence = None
    for line in text.splitlines():
        match = FENCE.match(line)
        if fence is None and match:
            fence = match.group(1)
            blocks.append((match.group(2).lower(), []))
        elif fence is not None and line.strip().startswith(fence) and not line.strip().strip(fence[0]):
            fence = None
        elif fence is not None:
            blocks[-1][1].append(line)
        else:
            prose.append(line)
    assert fence is None, f"{path}: a code block is never closed"
    return Page(path, text, "\n".join(prose), blocks)


@pytest.fixture(scope="module")
def pages() -> list[Page]:
    missing = [str(p) for p in PAGES if not p.is_file()]
    assert not missing, f"docs pages missing: {missing}"
    return [_read(p) for p in PAGES]


def _without_code_spans(text: str) -> str:
    return CODE_SPAN.sub("", text)


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: the rendered text, lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    text = text.replace("`", "").replace("*", "").strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(page: Page) -> set[str]:
    anchors: set[str] = set()
    for line in page.prose.splitlines():
        match = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if match:
            slug = _slug(match.group(1))
            n, unique = 0, slug
            while unique in anchors:  # GitHub numbers repeated headings: slug, slug-1, slug-2
                n += 1
                unique = f"{slug}-{n}"
            anchors.add(unique)
    return anchors


def _commands(lines: list[str], language: str) -> list[str]:
    """Shell command lines of a code block: `\\` continuations joined, comment lines dropped, `$ ` prompts only."""
    commands: list[str] = []
    pending = ""
    for raw in lines:
        line = raw.strip()
        if not pending:
            if language == "console":
                if not line.startswith("$ "):
                    continue
                line = line[2:]
            if not line or line.startswith("#"):
                continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        commands.append(pending + line)
        pending = ""
    if pending:
        commands.append(pending)
    return commands


def _simple_commands(command: str) -> list[list[str]]:
    """A shell line split into its simple commands (at && || ; |), environment assignments dropped."""
    tokens = shlex.split(command, comments=True)
    pieces: list[list[str]] = [[]]
    for token in tokens:
        if token in {"&&", "||", ";", "|"}:
            pieces.append([])
        else:
            pieces[-1].append(token)
    result = []
    for piece in pieces:
        while piece and re.match(r"^[A-Za-z_]\w*=", piece[0]):
            piece = piece[1:]
        if piece:
            result.append(piece)
    return result


def _lerobot_xvla_commands(pages: list[Page]) -> list[tuple[str, str]]:
    """(page, command) for every `lerobot-xvla ...` in a shell code block or an inline code span."""
    found = []
    for page in pages:
        for language, lines in page.blocks:
            if language not in SHELL_LANGUAGES:
                continue
            for command in _commands(lines, language):
                if "lerobot-xvla" in command:
                    found.append((page.name, command))
        for match in CODE_SPAN.finditer(page.prose):
            span = " ".join(match.group(2).split())
            words = span.split()
            # `lerobot-xvla convert: error: ...` quotes a message, not a command
            if words[:1] == ["lerobot-xvla"] and len(words) > 1 and not words[1].endswith(":"):
                # `lerobot-xvla convert` in a sentence names the command: it must exist, its arguments come later
                found.append((page.name, span + " --help" if len(words) == 2 else span))
    return found


# (a) links


def test_relative_links_point_to_existing_files_and_headings(pages):
    anchors = {page.path: _anchors(page) for page in pages}
    broken = []
    checked = 0
    for page in pages:
        for target in LINK.findall(_without_code_spans(page.prose)):
            if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target):  # https:, mailto:
                continue
            checked += 1
            file_part, _, anchor = target.partition("#")
            linked = (page.path.parent / file_part).resolve() if file_part else page.path
            if not linked.exists():
                broken.append(f"{page.name}: ({target}) -> {linked} does not exist")
                continue
            if anchor and linked.suffix == ".md":
                if linked not in anchors:
                    anchors[linked] = _anchors(_read(linked))
                if anchor not in anchors[linked]:
                    broken.append(f"{page.name}: ({target}) -> no heading with anchor #{anchor} in {linked.name}")
    assert checked > 20, f"only {checked} relative links found: is the link pattern still right?"
    assert not broken, "\n".join(broken)


def test_repository_paths_named_in_the_docs_exist(pages):
    missing = []
    for page in pages:
        for match in CODE_SPAN.finditer(page.prose):
            span = match.group(2).strip()
            if REPO_PATH.match(span) and not list(ROOT.glob(span.rstrip("/"))):
                missing.append(f"{page.name}: `{span}`")
        for language, lines in page.blocks:
            if language in SHELL_LANGUAGES:
                for path in COMMAND_PATH.findall("\n".join(lines)):
                    if not (ROOT / path).exists():
                        missing.append(f"{page.name}: {path} (in a command)")
    assert not missing, "paths that do not exist:\n" + "\n".join(missing)


def test_readme_layout_lists_existing_files(pages):
    readme = pages[0]
    section = readme.text.split("\n## Layout", 1)[1]
    tree = _read_block_after(section)
    parents: list[str] = []
    missing = []
    for line in tree:
        if not line.strip():
            continue
        depth = (len(line) - len(line.lstrip(" "))) // 2
        entry = line.split()[0]
        parents = parents[:depth]
        path = "/".join([*parents, entry.rstrip("/")])
        if not (ROOT / path).exists():
            missing.append(path)
        if entry.endswith("/"):
            parents.append(entry.rstrip("/"))
    assert len(tree) > 20
    assert not missing, f"README's Layout lists what does not exist: {missing}"


def _read_block_after(text: str) -> list[str]:
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if FENCE.match(line))
    end = next(i for i in range(start + 1, len(lines)) if lines[i].strip().startswith("```"))
    return lines[start + 1 : end]


# (b) lerobot-xvla commands


def test_lerobot_xvla_commands_parse(pages, tmp_path):
    from lerobot_xvla_cli import build_parser

    dummy = str(tmp_path / "placeholder")
    commands = _lerobot_xvla_commands(pages)
    failures = []
    parsed = 0
    for name, command in commands:
        for argv in _simple_commands(command):
            if argv[0] != "lerobot-xvla":
                continue
            args = [PLACEHOLDER.sub(dummy, token) for token in argv[1:]]
            err = io.StringIO()
            try:
                with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                    build_parser().parse_args(args)
            except SystemExit as exit_:
                if exit_.code not in (0, None):  # --help exits with 0
                    failures.append(f"{name}: {command!r}: {err.getvalue().strip().splitlines()[-1:]}")
                    continue
            parsed += 1
    assert parsed >= 5, f"only {parsed} lerobot-xvla commands found in the docs: {commands}"
    assert not failures, "lerobot-xvla commands in the docs that do not parse:\n" + "\n".join(failures)


# (c) --policy.* and --env.* flags


def _policy_fields() -> set[str]:
    from lerobot_xvla import XVLAConfig

    return {field.name for field in dataclasses.fields(XVLAConfig)}


def _lerobot_policy_arguments() -> set[str]:
    """What LeRobot's parser takes after --policy. besides the config's fields: the checkpoint path, the config
    type (the choice of class) and the packages to import for plugins."""
    from lerobot.configs import parser

    return {parser.PATH_KEY, parser.PLUGIN_DISCOVERY_SUFFIX, "type"}


def test_policy_flags_are_xvla_config_fields(pages):
    fields = _policy_fields()
    lerobot_own = _lerobot_policy_arguments()
    unknown = []
    seen = 0
    for page in pages:
        for name, star in POLICY_FLAG.findall(page.text):
            seen += 1
            if name in lerobot_own:
                continue
            # `--policy.optimizer_*` stands for a family of fields
            ok = any(f.startswith(name) for f in fields) if star else name in fields
            if not ok:
                unknown.append(f"{page.name}: --policy.{name}{star}")
    assert seen > 50, f"only {seen} --policy flags found"
    assert not unknown, "--policy flags that are not XVLAConfig fields:\n" + "\n".join(sorted(set(unknown)))


def _so101_reach_contexts(page: Page) -> list[str]:
    """Texts in which --env.* flags belong to --env.type=so101_reach: code blocks and code spans that set it, and
    sections whose heading names it."""
    contexts = ["\n".join(lines) for _, lines in page.blocks]
    contexts += [m.group(2) for m in CODE_SPAN.finditer(page.prose)]
    contexts = [text for text in contexts if "--env.type=so101_reach" in text]
    for section in re.split(r"\n(?=#{1,6} )", "\n" + page.prose):
        heading = section.strip().splitlines()[0] if section.strip() else ""
        if heading.startswith("#") and "--env.type=so101_reach" in heading:
            contexts.append(section)
    return contexts


def test_so101_reach_env_flags_are_env_config_fields(pages):
    from lerobot_xvla.envs import SO101ReachEnvConfig

    fields = {field.name for field in dataclasses.fields(SO101ReachEnvConfig)} | {"type"}
    unknown = []
    seen = 0
    for page in pages:
        for context in _so101_reach_contexts(page):
            for name in ENV_FLAG.findall(context):
                seen += 1
                if name not in fields:
                    unknown.append(f"{page.name}: --env.{name}")
    assert seen > 3, f"only {seen} --env flags found next to --env.type=so101_reach"
    assert not unknown, "--env flags of so101_reach that SO101ReachEnvConfig lacks:\n" + "\n".join(sorted(set(unknown)))


# (d) the README's set-up commands, and the pages it links


def test_readme_quick_start_holds_the_two_setup_commands(pages):
    readme = pages[0]
    quick_start = readme.text.split("\n## Quick start", 1)
    assert len(quick_start) == 2, "README.md has no '## Quick start' section"
    section = quick_start[1].split("\n## ", 1)[0]
    block = _read_block_after(section)
    for command in SETUP_COMMANDS:
        assert command in block, f"README's Quick start lost the line {command!r} (CI runs it)"
        assert (ROOT / command.split()[1]).is_file()


def test_readme_links_every_docs_page(pages):
    linked = {(README.parent / target.partition("#")[0]).resolve() for target in LINK.findall(pages[0].prose)}
    unlinked = [p.name for p in (ROOT / "docs").glob("*.md") if p.resolve() not in linked]
    assert not unlinked, f"docs pages the README does not link: {unlinked}"


def test_docs_pages_open_with_a_title_and_a_summary(pages):
    for page in pages:
        if page.path.parent.name != "docs":
            continue
        paragraphs = [p.strip() for p in page.text.split("\n\n") if p.strip()]
        assert paragraphs[0].startswith("# ") and "\n" not in paragraphs[0], f"{page.name}: no title line"
        summary = paragraphs[1]
        assert not summary.startswith(("#", "```", "|", "- ")), f"{page.name}: no summary paragraph under the title"
