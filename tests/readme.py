"""Runs the README as a reader would: every shell, console and Python block, in order, per section.

The rules (also in the README's last section, "The README is tested"):

- Each `##` section runs on its own: a scratch copy of the repository (`models/` copied, the
  rest linked), a fresh shell and, started before its first block, a fresh gateway as
  `make run` starts it (demo route file, store `var/gateway.db`, diff log `var/shadow`, demo
  admin token, metrics on), on free ports. Blocks run in order and share shell variables,
  exported variables and the working directory.
- The environment has `.venv/bin` first on PATH, `GATEWAY_TARGET` / `GATEWAY_ADMIN_TARGET`
  pointing at that gateway and `GATEWAY_ADMIN_TOKEN` set to the demo token. In commands,
  `localhost:8001`, `localhost:8002` and `localhost:9464` (or `127.0.0.1:...`) become its
  inference, admin and metrics addresses; in a section without one, free ports (also set as
  GATEWAY_LISTEN / GATEWAY_ADMIN_LISTEN). The examples' other fixed ports (8011, 8012, 8031,
  8032, 2379, 2380) become free ports in every section.
- ```sh / ```bash blocks run as one script with `set -eo pipefail`: any failing command fails
  the test. ```console blocks hold `$ ` commands (continued by `> ` lines) with their output
  below; every output line shown must appear in the real output, in order (`...` matches
  anything within a line; lines not shown are not checked); `[exit N]` expects exit status N.
  ```python blocks run as scripts. Other blocks (yaml, plain text) are not run.
- `<!-- readme: skip REASON -->` before a block: not run (a reason is required).
  `<!-- readme: env NAME=VALUE ... -->`: environment for the rest of the section.
  `<!-- readme: gateway FLAG ... -->`: extra `gateway serve` flags for this section's gateway;
  `<!-- readme: gateway none -->`: the section needs none.
  `<!-- readme: timeout SECONDS -->`: the next block's limit (default 180 s).
  `<!-- readme: requires TOOL ... -->`: the next block runs only where those commands are
  installed (etcd, curl); otherwise it is reported as not run.
- Output is collected in a file, so a block may start a server in the background (`... &`);
  what a section started is stopped when it ends.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from testkit.etcd import free_port

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DEMO_TOKEN = "dev-admin-token-change-me"
RUNNABLE = {"sh": "script", "bash": "script", "shell": "script", "console": "console", "python": "python"}
DEFAULT_TIMEOUT = 180.0
_DIRECTIVE = re.compile(r"^\s*<!--\s*readme:\s*(\w+)\s*(.*?)\s*-->\s*$")
_FENCE = re.compile(r"^(\s*)```\s*([\w+-]*)\s*$")
_PORTS = {"8001": "inference", "8002": "admin", "9464": "metrics"}
#: Other fixed ports the README's examples use (a second process, etcd): free ports per section.
_OTHER_PORTS = {
    "8011": "inference-b",
    "8012": "admin-b",
    "8031": "inference-c",
    "8032": "admin-c",
    "2379": "etcd",
    "2380": "etcd-peer",
}


@dataclass
class Block:
    """One fenced block that runs, where it is, and what the directives before it said."""

    line: int
    kind: str  # script | console | python
    text: str
    skip: str = ""
    timeout: float = DEFAULT_TIMEOUT
    requires: tuple[str, ...] = ()


@dataclass
class Section:
    """A `##` section: its blocks and its settings."""

    title: str
    line: int
    blocks: list[Block] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    gateway_flags: list[str] = field(default_factory=list)
    gateway: bool = True


class ReadmeError(AssertionError):
    """The README does not run as written (or a directive is malformed)."""


class _Parser:
    """Reads the README line by line: headings, fences, directives."""

    def __init__(self) -> None:
        self.sections = [Section("(before the first section)", 1)]
        self.skip, self.timeout = "", DEFAULT_TIMEOUT
        self.requires: tuple[str, ...] = ()
        self.fence: tuple[int, str, str, list[str]] | None = None  # (line, indent, language, lines)

    def line(self, number: int, line: str) -> None:
        if self.fence is not None:
            self._inside(line)
            return
        opened = _FENCE.match(line)
        if opened:
            self.fence = (number, opened.group(1), opened.group(2).lower(), [])
        elif line.startswith("## "):
            self.sections.append(Section(line[3:].strip(), number))
            self.skip, self.timeout, self.requires = "", DEFAULT_TIMEOUT, ()
        else:
            directive = _DIRECTIVE.match(line)
            if directive is not None:
                self._directive(directive.group(1), directive.group(2), f"README.md:{number}")

    def _inside(self, line: str) -> None:
        assert self.fence is not None
        if line.strip() != "```":
            self.fence[3].append(line)
            return
        start, indent, language, body = self.fence
        self.fence = None
        kind = RUNNABLE.get(language)
        if kind is not None:
            block = "\n".join(b[len(indent) :] if b.startswith(indent) else b for b in body)
            self.sections[-1].blocks.append(Block(start, kind, block, self.skip, self.timeout, self.requires))
        self.skip, self.timeout, self.requires = "", DEFAULT_TIMEOUT, ()

    def _directive(self, name: str, argument: str, where: str) -> None:
        section = self.sections[-1]
        if name == "skip":
            if not argument:
                raise ReadmeError(f"{where}: `readme: skip` needs a reason")
            self.skip = argument
        elif name == "timeout":
            self.timeout = float(argument)
        elif name == "requires":
            if not argument:
                raise ReadmeError(f"{where}: `readme: requires` names the commands the block needs")
            self.requires = tuple(argument.split())
        elif name == "env":
            for pair in shlex.split(argument):
                key, sep, value = pair.partition("=")
                if not sep:
                    raise ReadmeError(f"{where}: `readme: env` takes NAME=VALUE, got {pair!r}")
                section.env[key] = value
        elif name == "gateway":
            if argument == "none":
                section.gateway = False
            else:
                section.gateway_flags += shlex.split(argument)
        else:
            raise ReadmeError(f"{where}: unknown directive `readme: {name}` (skip, requires, env, gateway, timeout)")


def parse(text: str) -> list[Section]:
    """The README's `##` sections with their runnable blocks and directives."""
    parser = _Parser()
    for number, line in enumerate(text.splitlines(), start=1):
        parser.line(number, line)
    if parser.fence is not None:
        raise ReadmeError(f"README.md:{parser.fence[0]}: a code block is never closed")
    return [s for s in parser.sections if s.blocks]


# --- running -------------------------------------------------------------------------------------


class Gateway:
    """`gateway serve` as `make run` starts it, on free ports, in the section's scratch directory."""

    def __init__(self, cwd: Path, env: dict[str, str], flags: list[str]) -> None:
        self.log = cwd / "var" / "readme-gateway.log"
        self.log.parent.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            [
                sys.executable, "-m", "gateway.cli", "--log-level", "WARNING", "serve", "--config", "models/gateway.yaml",
                "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0",
                "--store", "sqlite:///var/gateway.db", "--shadow-log-dir", "var/shadow", *flags,
            ],
            cwd=cwd,
            env={**env, "GATEWAY_ADMIN_TOKENS": f"dev={DEMO_TOKEN}"},
            stdout=subprocess.PIPE,
            stderr=self.log.open("w"),
            text=True,
            start_new_session=True,
        )  # fmt: skip
        assert self.process.stdout is not None
        ready = self.process.stdout.readline()
        found = re.search(r"inference on (\S+), admin on (\S+?)(?:, metrics on (\S+))? \(", ready)
        if found is None:
            self.stop()
            raise ReadmeError(f"the section's gateway did not start: {ready!r}\n{self.log.read_text()[-3000:]}")
        self.ready_line = ready.strip()
        self.addresses = {"inference": found.group(1), "admin": found.group(2), "metrics": found.group(3) or ""}

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it does not go."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)


def scratch_copy(into: Path) -> Path:
    """A scratch checkout: `models/` copied (sections may write beside it), everything else linked."""
    into.mkdir(parents=True)
    for entry in ROOT.iterdir():
        if entry.name in {"var", ".git", "models", ".pytest_cache", ".mypy_cache", ".ruff_cache"}:
            continue
        (into / entry.name).symlink_to(entry)
    shutil.copytree(ROOT / "models", into / "models")
    return into


def _baseline_variables() -> str:
    return subprocess.run(["bash", "-c", "compgen -v"], capture_output=True, text=True, check=True).stdout


class Shell:
    """A shell whose variables, functions and working directory carry from one command to the next."""

    def __init__(self, cwd: Path, env: dict[str, str]) -> None:
        self.cwd = cwd
        self.env = env
        self.state = cwd.parent / "shell-state.sh"
        baseline = cwd.parent / "shell-baseline.txt"
        baseline.write_text(_baseline_variables() + "\n".join(["BASH_REMATCH", "PIPESTATUS", "_", "rc"]) + "\n")
        self.state.write_text(f"cd {shlex.quote(str(cwd))}\n")
        self.groups: list[int] = []
        state, base = shlex.quote(str(self.state)), shlex.quote(str(baseline))
        self._save = (
            "__readme_save() {\n"
            "  __readme_rc=$?\n"
            f"  {{ export -p; declare -p $(compgen -v | grep -v '^__readme' | grep -vxF -f {base}) 2>/dev/null"
            ' | grep -v \'^declare -[a-zA-Z]*r\'; declare -f; echo "cd $(printf %q "$PWD")"; }'
            f" > {state}.new && mv {state}.new {state}\n"
            "  exit $__readme_rc\n"
            "}\n"
            "trap __readme_save EXIT"
        )

    def run(self, script: str, *, strict: bool, timeout: float) -> tuple[int, str]:
        """Run `script` with the shell's state; (exit status, stdout and stderr interleaved)."""
        prelude = [f"source {shlex.quote(str(self.state))}", self._save, "set -o pipefail"]
        if strict:
            prelude += ["set -e", "trap 'echo \"readme: exit $? from: $BASH_COMMAND\" >&2' ERR"]
        # Output goes to a file, not a pipe: a server a block starts in the background keeps its
        # copy of the pipe open, and waiting for the pipe's end would wait for the server.
        log = self.cwd.parent / "command-output.txt"
        with log.open("w") as out:
            process = subprocess.Popen(
                ["bash", "-c", "\n".join([*prelude, script])],
                cwd=self.cwd,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            self.groups.append(process.pid)
            try:
                status = process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
                output = log.read_text(errors="replace")
                return 124, output + f"\nreadme: timed out after {timeout:g} s (a server in a block? mark it skip)"
        return status, log.read_text(errors="replace")

    def close(self) -> None:
        """End what the section's commands left running in the background (their process groups)."""
        for group in self.groups:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(group, signal.SIGTERM)


def substitute(text: str, addresses: dict[str, str]) -> str:
    """The README's default addresses replaced by the section gateway's."""

    names = {**_PORTS, **_OTHER_PORTS}

    def replace(match: re.Match[str]) -> str:
        address = addresses.get(names[match.group(2)], "")
        return address or match.group(0)

    return re.sub(rf"\b(localhost|127\.0\.0\.1):({'|'.join(names)})\b", replace, text)


def free_addresses(names: Iterable[str]) -> dict[str, str]:
    """A free loopback address for each name (the README's fixed ports, moved so runs never collide)."""
    return {name: f"127.0.0.1:{free_port()}" for name in names}


def console_commands(text: str) -> Iterator[tuple[int, str, list[str]]]:
    """(line offset, command, expected output lines) of a console block."""
    command: list[str] = []
    expected: list[str] = []
    offset = 0
    for index, line in enumerate(text.splitlines()):
        if line.startswith("$ "):
            if command:
                yield offset, "\n".join(command), expected
            command, expected, offset = [line[2:]], [], index
        elif line.startswith("> ") and command and not expected:
            command.append(line[2:])
        elif command:
            expected.append(line.rstrip())
        elif line.strip():
            raise ReadmeError(f"a console block must start with a `$ ` command, got {line!r}")
    if command:
        yield offset, "\n".join(command), expected


def _pattern(expected: str) -> re.Pattern[str]:
    return re.compile(".*?".join(re.escape(part) for part in expected.split("...")) + r"\s*")


def check_output(expected: list[str], actual: str) -> tuple[int, str]:
    """The exit status the block expects, and what is missing from `actual` ("" when all is there)."""
    status = 0
    wanted = []
    for want in expected:
        exited = re.fullmatch(r"\[exit (\d+)\]", want.strip())
        if exited:
            status = int(exited.group(1))
        elif want.strip():
            wanted.append(want)
    lines = actual.splitlines()
    position = 0
    for want in wanted:
        pattern = _pattern(want)
        while position < len(lines) and not pattern.fullmatch(lines[position].rstrip()):
            position += 1
        if position == len(lines):
            return status, want
        position += 1
    return status, ""


@dataclass
class SectionRun:
    """Runs one section's blocks; the first failure raises ReadmeError naming the README line."""

    section: Section
    workdir: Path
    gateway: Gateway | None = None
    shell: Shell | None = None
    ran: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # blocks not run: a tool they need is not installed
    #: The README's fixed addresses, by name, as this section runs them.
    addresses: dict[str, str] = field(default_factory=dict)

    def env(self) -> dict[str, str]:
        venv = ROOT / ".venv" / "bin"
        base = {k: v for k, v in os.environ.items() if not k.startswith(("GATEWAY_", "OTEL_"))}
        base["PATH"] = f"{venv}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}{base.get('PATH', '')}"
        base["PYTHONUNBUFFERED"] = "1"
        return base

    def start(self) -> None:
        cwd = scratch_copy(self.workdir / "repo")
        env = self.env()
        self.addresses = free_addresses(_OTHER_PORTS.values())
        if self.section.gateway:
            self.gateway = Gateway(cwd, env, self.section.gateway_flags)
            self.addresses.update(self.gateway.addresses)
        else:  # the section starts its own: the defaults move to free ports, through the settings' environment
            self.addresses.update(free_addresses(_PORTS.values()))
            env.update(
                GATEWAY_LISTEN=self.addresses["inference"],
                GATEWAY_ADMIN_LISTEN=self.addresses["admin"],
            )
        env.update(GATEWAY_TARGET=self.addresses["inference"], GATEWAY_ADMIN_TARGET=self.addresses["admin"])
        env["GATEWAY_ADMIN_TOKEN"] = DEMO_TOKEN
        env.update({k: substitute(v, self.addresses) for k, v in self.section.env.items()})
        self.shell = Shell(cwd, env)

    def run(self) -> None:
        for block in self.section.blocks:
            if block.skip:
                continue
            missing = [tool for tool in block.requires if shutil.which(tool) is None]
            if missing:
                self.missing.append(f"README.md:{block.line} needs {', '.join(missing)}")
                continue
            if self.shell is None:
                self.start()
            self._block(block)

    def _block(self, block: Block) -> None:
        assert self.shell is not None
        text = substitute(block.text, self.addresses)
        where = f"README.md:{block.line} ({self.section.title})"
        if block.kind == "script":
            status, output = self.shell.run(text, strict=True, timeout=block.timeout)
            self.ran.append(text)
            if status:
                raise ReadmeError(f"{where}: the block failed (exit {status}):\n{text}\n--- output ---\n{output}")
        elif block.kind == "python":
            script = self.shell.cwd.parent / f"block-{block.line}.py"
            script.write_text(text)
            status, output = self.shell.run(f"python {shlex.quote(str(script))}", strict=True, timeout=block.timeout)
            self.ran.append(text)
            if status:
                raise ReadmeError(
                    f"{where}: the Python block failed (exit {status}):\n{text}\n--- output ---\n{output}"
                )
        else:
            for offset, command, expected in console_commands(text):
                status, output = self.shell.run(command, strict=False, timeout=block.timeout)
                self.ran.append(command)
                line = block.line + 1 + offset
                want_status, missing = check_output(expected, output)
                if status != want_status:
                    raise ReadmeError(
                        f"README.md:{line}: `{command}` exited {status}, the README expects {want_status}:\n{output}"
                    )
                if missing:
                    raise ReadmeError(
                        f"README.md:{line}: `{command}` did not print (in order) the line {missing!r}; "
                        f"it printed:\n{output}"
                    )

    def close(self) -> None:
        if self.shell is not None:
            self.shell.close()
        if self.gateway is not None:
            self.gateway.stop()


def run_section(section: Section) -> SectionRun:
    """Run one section in a scratch directory; raises ReadmeError on the first failure."""
    with tempfile.TemporaryDirectory(prefix="readme-") as scratch:
        run = SectionRun(section, Path(scratch))
        try:
            run.run()
        finally:
            run.close()
        return run
