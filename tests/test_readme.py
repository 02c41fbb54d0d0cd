"""The README runs as written: each `##` section against its own gateway (see tests/readme.py)."""

from __future__ import annotations

import re
import warnings

import pytest

from tests.readme import (
    README,
    ReadmeError,
    check_output,
    console_commands,
    free_addresses,
    parse,
    run_section,
    substitute,
)

SECTIONS = parse(README.read_text())


def _slug(title: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-")


@pytest.mark.slow
@pytest.mark.parametrize("section", SECTIONS, ids=[_slug(s.title) for s in SECTIONS])
def test_readme_section_runs_as_written(section) -> None:  # type: ignore[no-untyped-def]
    run = run_section(section)
    if run.missing and not run.ran:
        pytest.skip("; ".join(run.missing))
    assert run.ran or all(b.skip for b in section.blocks)
    for missing in run.missing:
        warnings.warn(f"not run: {missing}", stacklevel=1)


def test_every_block_that_does_not_run_says_why() -> None:
    skipped = [(s.title, b.line, b.skip) for s in SECTIONS for b in s.blocks if b.skip]
    assert all(reason.strip() for _, _, reason in skipped)
    ran = sum(1 for s in SECTIONS for b in s.blocks if not b.skip)
    assert ran >= 10, "the README's blocks are mostly skipped: the harness tests nothing"


# --- the harness itself ---------------------------------------------------------------------------

SAMPLE = """# Title

```sh
echo before any section
```

## One

<!-- readme: env GREETING="hello there" -->
```console
$ echo "$GREETING"
hello ...
```

<!-- readme: skip a production TLS example -->
```sh
gateway serve --tls-cert /etc/prod.pem
```

```yaml
not: run
```

## Two
<!-- readme: gateway none -->
<!-- readme: timeout 5 -->
```python
print("hi")
```
"""


def test_parse_sections_blocks_and_directives() -> None:
    first, one, two = parse(SAMPLE)
    assert first.title == "(before the first section)" and first.blocks[0].kind == "script"
    assert one.title == "One" and one.env == {"GREETING": "hello there"} and one.gateway
    console, skipped = one.blocks
    assert (console.kind, console.line, skipped.skip) == ("console", 10, "a production TLS example")
    assert two.gateway is False and two.blocks[0].kind == "python" and two.blocks[0].timeout == 5


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("## A\n<!-- readme: skip -->\n```sh\ntrue\n```\n", "needs a reason"),
        ("## A\n<!-- readme: run-twice -->\n", "unknown directive"),
        ("## A\n```sh\ntrue\n", "never closed"),
    ],
)
def test_malformed_directives_are_refused(text: str, problem: str) -> None:
    with pytest.raises(ReadmeError, match=problem):
        parse(text)


def test_console_output_matching() -> None:
    ((_, command, expected),) = list(console_commands("$ gateway x \\\n> --y\nline one\n  two: ...\n[exit 1]"))
    assert command == "gateway x \\\n--y"
    assert check_output(expected, "noise\nline one\nmore\n  two: 0.25 and more\n") == (1, "")
    assert check_output(expected, "  two: 1\nline one\n") == (1, "  two: ...")  # order matters
    assert check_output(["a...b"], "a123b") == (0, "") and check_output(["a...b"], "xa123b")[1] == "a...b"


def test_addresses_are_rewritten_to_the_sections_gateway() -> None:
    addresses = {"inference": "127.0.0.1:40001", "admin": "127.0.0.1:40002", "metrics": "127.0.0.1:40003"}
    text = "grpcurl localhost:8001 list; curl http://127.0.0.1:9464/metrics; x localhost:80012"
    assert substitute(text, addresses) == (
        "grpcurl 127.0.0.1:40001 list; curl http://127.0.0.1:40003/metrics; x localhost:80012"
    )
    others = free_addresses(["etcd", "admin-b"])
    assert substitute("etcd://127.0.0.1:2379/demo --target 127.0.0.1:8012", others) == (
        f"etcd://{others['etcd']}/demo --target {others['admin-b']}"
    )
    assert others["etcd"] != "127.0.0.1:2379"


def test_a_failing_command_fails_the_section(tmp_path_factory: pytest.TempPathFactory) -> None:
    (section,) = parse("## Fails\n<!-- readme: gateway none -->\n```sh\ntrue\nfalse\necho never\n```\n")
    with pytest.raises(ReadmeError, match=r"README.md:3 \(Fails\): the block failed \(exit 1\)"):
        run_section(section)
    (section,) = parse("## Output\n<!-- readme: gateway none -->\n```console\n$ echo one\ntwo\n```\n")
    with pytest.raises(ReadmeError, match="did not print \\(in order\\) the line 'two'"):
        run_section(section)
    (section,) = parse(
        "## State\n<!-- readme: gateway none -->\n```sh\nexport A=1\nB=2\ncd models\n```\n"
        "```console\n$ echo $A $B $(basename $PWD)\n1 2 models\n```\n"
    )
    assert len(run_section(section).ran) == 2


def test_a_background_server_does_not_hold_the_block_and_is_stopped(tmp_path_factory: pytest.TempPathFactory) -> None:
    text = (
        "## Background\n<!-- readme: gateway none -->\n```console\n$ sleep 300 & SLEEPER=$!\n"
        "$ kill -0 $SLEEPER && echo alive\nalive\n```\n"
        "<!-- readme: requires no-such-tool-here -->\n```sh\nno-such-tool-here\n```\n"
    )
    (section,) = parse(text)
    run = run_section(section)
    assert len(run.ran) == 2 and run.missing == ["README.md:9 needs no-such-tool-here"]
