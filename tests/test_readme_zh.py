"""README.zh.md is README.md in Chinese with the same commands: every `mm …` command of the Chinese
README (in code blocks, comments aside, and in inline code) also appears in README.md."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def block_commands(text: str) -> list[str]:
    """`mm …` command lines of the fenced code blocks: continuation lines joined, `# comments`
    (which the translation translates) dropped, whitespace normalised."""
    blocks = re.findall(r"```[a-z]*\n(.*?)```", text, flags=re.S)
    commands = []
    for block in blocks:
        for line in block.replace("\\\n", " ").splitlines():
            line = " ".join(line.split(" #")[0].split())
            for part in line.split(" && "):  # install one-liners end with `&& mm demo ...`
                if part.startswith("mm "):
                    commands.append(part)
    return commands


def inline_commands(text: str) -> list[str]:
    return [c for c in re.findall(r"`([^`\n]+)`", text) if c.startswith("mm ")]


def test_every_command_of_the_chinese_readme_is_in_the_english_one():
    en, zh = (ROOT / "README.md").read_text(), (ROOT / "README.zh.md").read_text()
    en_commands = set(block_commands(en))
    zh_commands = block_commands(zh)
    assert len(zh_commands) >= 20  # the translation has its commands, not a summary
    missing = [c for c in zh_commands if c not in en_commands]
    assert not missing, f"README.zh.md commands not in README.md: {missing}"
    missing = [c for c in inline_commands(zh) if c not in en]
    assert not missing, f"README.zh.md inline commands not in README.md: {missing}"


def test_the_chinese_readme_is_chinese_and_links_the_english_one():
    zh = (ROOT / "README.zh.md").read_text()
    assert "README.md" in zh
    assert sum("\u4e00" <= ch <= "\u9fff" for ch in zh) > 2000  # CJK characters: a translation
