"""The images' Dockerfiles, checked without a Docker engine (none here): they parse,
their bases are pinned, they copy only paths that exist and that .dockerignore lets
into the build context, they run as non-root, and they install the package's own
pinned dependency set (pyproject extras + constraints.txt): the operator image no
torch, the trainer image torch with CUDA at Lethe's Ray version."""

from __future__ import annotations

import fnmatch
import importlib.metadata as md
import json
import re
import shlex
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[2]
OPERATOR = REPO / "operator" / "Dockerfile"
TRAINER = REPO / "trainer" / "Dockerfile"
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())

INSTRUCTIONS = {
    "FROM", "RUN", "CMD", "LABEL", "MAINTAINER", "EXPOSE", "ENV", "ADD", "COPY",
    "ENTRYPOINT", "VOLUME", "USER", "WORKDIR", "ARG", "ONBUILD", "STOPSIGNAL",
    "HEALTHCHECK", "SHELL",
}  # fmt: skip


# -- a small Dockerfile parser ------------------------------------------------------
@dataclass
class Instruction:
    cmd: str
    args: str
    line: int


@dataclass
class Stage:
    image: str
    name: str | None
    body: list[Instruction] = field(default_factory=list)


def parse(text: str) -> list[Instruction]:
    """Instructions with continuation lines joined; comments (also inside a
    continuation, as Docker drops them) and blank lines skipped."""
    out: list[Instruction] = []
    buf, start = "", 0
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if line.startswith("#") or (not line and not buf):
            if line.startswith("# escape="):
                raise ValueError("escape directive not supported")
            continue
        if not buf:
            start = n
        if line.endswith("\\"):
            buf += line[:-1].rstrip() + " "
            continue
        buf += line
        cmd, _, args = buf.partition(" ")
        if cmd.upper() not in INSTRUCTIONS:
            raise ValueError(f"line {start}: unknown instruction {cmd!r}")
        out.append(Instruction(cmd.upper(), args.strip(), start))
        buf = ""
    if buf:
        raise ValueError("dangling line continuation at the end")
    return out


def stages(instructions: list[Instruction]) -> list[Stage]:
    out: list[Stage] = []
    for ins in instructions:
        if ins.cmd == "FROM":
            words = [w for w in ins.args.split() if not w.startswith("--platform")]
            if len(words) == 3 and words[1].upper() == "AS":
                out.append(Stage(words[0], words[2]))
            elif len(words) == 1:
                out.append(Stage(words[0], None))
            else:
                raise ValueError(f"line {ins.line}: bad FROM {ins.args!r}")
        elif not out:
            assert ins.cmd == "ARG", f"line {ins.line}: {ins.cmd} before the first FROM"
        else:
            out[-1].body.append(ins)
    return out


def copy_args(ins: Instruction) -> tuple[dict[str, str], list[str], str]:
    """(flags, sources, destination) of a COPY or ADD, shell or JSON form."""
    rest, flags = ins.args, {}
    while m := re.match(r"--([\w-]+)(?:=(\S*))?\s+", rest):
        flags[m.group(1)] = m.group(2) or ""
        rest = rest[m.end() :]
    words = json.loads(rest) if rest.startswith("[") else shlex.split(rest)
    assert len(words) >= 2, f"line {ins.line}: COPY needs a source and a destination"
    return flags, words[:-1], words[-1]


def dockerignore() -> list[tuple[bool, str]]:
    rules = []
    for line in (REPO / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            neg = line.startswith("!")
            rules.append((neg, line.lstrip("!").strip("/")))
    return rules


def in_context(path: str) -> bool:
    """Whether .dockerignore lets ``path`` into the build context (last match wins;
    a pattern that matches a parent directory matches everything below it)."""
    parts = path.strip("/").split("/")
    included = True
    for neg, pattern in dockerignore():
        for i in range(1, len(parts) + 1):
            prefix = "/".join(parts[:i])
            pat = pattern.removeprefix("**/")
            hit = fnmatch.fnmatchcase(prefix, pattern) or (
                pattern.startswith("**/") and fnmatch.fnmatchcase(parts[i - 1], pat)
            )
            if hit:
                included = neg
                break
    return included


def pip_installs(stage: Stage) -> list[list[str]]:
    """The argument lists of every `pip install` in the stage's RUN lines."""
    out = []
    for ins in stage.body:
        if ins.cmd != "RUN":
            continue
        words = shlex.split(ins.args)
        for i, w in enumerate(words[:-1]):
            if w.endswith("pip") and words[i + 1] == "install":
                rest = words[i + 2 :]
                ends = [n for n, x in enumerate(rest) if x in ("&&", ";", "||", "|")]
                out.append(rest[: ends[0]] if ends else rest)
    return out


def constraints() -> dict[str, str]:
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            pins[canonicalize_name(name)] = version
    return pins


def install_target(args: list[str]) -> tuple[set[str], list[str], list[str]]:
    """(extras of the local project `.[...]`, other requirements, options)."""
    extras: set[str] = set()
    others, options = [], []
    it = iter(args)
    for a in it:
        if a in ("-c", "--constraint"):
            options.append(f"-c {next(it)}")
        elif a.startswith("-"):
            options.append(a)
        elif a == "." or a.startswith(".["):
            extras = {e.strip() for e in a[2:-1].split(",")} if a.startswith(".[") else set()
            others.append(".")
        else:
            others.append(a)
    return extras, [o for o in others if o != "."], options


def closure(extras: set[str], more: list[str]) -> set[str]:
    """Every distribution the package with ``extras`` (and ``more``) pulls in, from
    pyproject for Lethe itself and the installed metadata for the rest."""
    project = PYPROJECT["project"]
    reqs = [Requirement(r) for r in project["dependencies"]]
    for e in extras:
        reqs += [Requirement(r) for r in project["optional-dependencies"][e]]
    reqs += [Requirement(r) for r in more]
    seen: set[str] = set()
    todo = [(r, set()) for r in reqs]
    while todo:
        req, req_extras = todo.pop()
        envs = [{"extra": x} for x in req_extras] or [{"extra": ""}]
        if req.marker and not any(req.marker.evaluate(env) for env in envs):
            continue
        name = canonicalize_name(req.name)
        key = name + "[" + ",".join(sorted(req.extras)) + "]"
        if key in seen:
            continue
        seen.add(key)
        for r in md.distribution(name).requires or []:
            todo.append((Requirement(r), set(req.extras)))
    return {k.split("[")[0] for k in seen}


IMAGES = {
    # Dockerfile: (extras the image installs, packages it must not hold)
    OPERATOR: ({"operator"}, {"torch", "ray", "triton"}),
    TRAINER: ({"train"}, set()),
}


# -- the checks ---------------------------------------------------------------------
@pytest.mark.parametrize("dockerfile", list(IMAGES), ids=lambda p: p.parent.name)
def test_dockerfile_parses(dockerfile: Path) -> None:
    ins = parse(dockerfile.read_text())
    st = stages(ins)
    assert st, "no FROM"
    names = [s.name for s in st if s.name]
    assert len(names) == len(set(names)), "duplicate stage names"
    for i in (i for s in st for i in s.body):
        if i.cmd in ("ENTRYPOINT", "CMD") and i.args.startswith("["):
            assert all(isinstance(a, str) for a in json.loads(i.args)), i.args
    if dockerfile == OPERATOR:  # the trainer keeps the Ray image's own entry point
        entry = [json.loads(i.args) for i in st[-1].body if i.cmd == "ENTRYPOINT"]
        assert entry == [["python", "-m", "lethe_operator"]]


def test_parser_itself() -> None:
    ins = parse('FROM a AS b\nRUN x \\\n  # a comment\n  && y\nCOPY --from=b ["/p q", "/r"]\n')
    assert [i.cmd for i in ins] == ["FROM", "RUN", "COPY"]
    assert ins[1].args == "x && y"
    assert copy_args(ins[2]) == ({"from": "b"}, ["/p q"], "/r")
    with pytest.raises(ValueError):
        parse("FROM a\nRUNN x\n")
    with pytest.raises(ValueError):
        parse("FROM a\nRUN x \\\n")


@pytest.mark.parametrize("dockerfile", list(IMAGES), ids=lambda p: p.parent.name)
def test_bases_are_pinned(dockerfile: Path) -> None:
    st = stages(parse(dockerfile.read_text()))
    known = set()
    for s in st:
        if s.image not in known:  # not an earlier stage: a registry image
            assert "$" not in s.image, f"{s.image}: pin the base in the FROM line"
            repo, _, tag = s.image.partition("@")[0].rpartition(":")
            assert repo and tag and tag != "latest", f"{s.image}: no version tag"
            assert re.match(r"\d+\.\d+\.\d+", tag), f"{s.image}: tag is not a full version"
        if s.name:
            known.add(s.name)
    py = re.search(r">=(\d+\.\d+)", PYPROJECT["project"]["requires-python"]).group(1)
    ray = constraints()["ray"]
    if dockerfile == OPERATOR:
        assert all(s.image.startswith(f"python:{py}.") for s in st if s.image not in known)
    else:
        (base,) = {s.image for s in st}
        tag = f"{ray}-py{py.replace('.', '')}-"
        assert base.startswith(f"rayproject/ray:{tag}"), (base, tag)
        assert re.fullmatch(r"gpu|cu\d+", base.split(tag, 1)[1]), f"{base}: not a CUDA image"


@pytest.mark.parametrize("dockerfile", list(IMAGES), ids=lambda p: p.parent.name)
def test_copies_only_existing_paths(dockerfile: Path) -> None:
    st = stages(parse(dockerfile.read_text()))
    stage_names = {s.name for s in st if s.name}
    copied = []
    for s in st:
        for ins in s.body:
            assert ins.cmd != "ADD", f"line {ins.line}: use COPY (ADD fetches and unpacks)"
            if ins.cmd != "COPY":
                continue
            flags, sources, _ = copy_args(ins)
            if "from" in flags:
                assert flags["from"] in stage_names, f"line {ins.line}: unknown stage"
                continue
            for src in sources:
                assert ".." not in Path(src).parts, f"{src}: outside the build context"
                assert (REPO / src).exists(), f"line {ins.line}: {src} does not exist"
                assert in_context(src), f"line {ins.line}: .dockerignore excludes {src}"
                copied.append(src)
    # what pip needs to build the package: its metadata, constraints and both packages
    assert {"pyproject.toml", "constraints.txt", "README.md"} <= set(copied)
    roots = PYPROJECT["tool"]["setuptools"]["packages"]["find"]["where"]
    for root in roots:
        assert any(c.startswith(root + "/") for c in copied), f"{root}/ is not copied"
    # and nothing else gets into the context
    for path in (".venv", ".git", ".lethe", "tests", "bench", "charts", "trainer/Dockerfile"):
        assert not in_context(path), path
    assert not in_context("trainer/lethe/__pycache__/x.pyc")


@pytest.mark.parametrize("dockerfile", list(IMAGES), ids=lambda p: p.parent.name)
def test_runs_as_non_root(dockerfile: Path) -> None:
    final = stages(parse(dockerfile.read_text()))[-1]
    users = [i.args for i in final.body if i.cmd == "USER"]
    assert users, "the final stage sets no USER (it would run as the base's user)"
    uid = users[-1].split(":")[0]
    # numeric, so Kubernetes' runAsNonRoot can check it
    assert uid.isdigit() and int(uid) > 0, users[-1]


@pytest.mark.parametrize("dockerfile", list(IMAGES), ids=lambda p: p.parent.name)
def test_installs_the_pinned_dependency_set(dockerfile: Path) -> None:
    want_extras, forbidden = IMAGES[dockerfile]
    pins = constraints()
    installs = [a for s in stages(parse(dockerfile.read_text())) for a in pip_installs(s)]
    assert len(installs) == 1, installs
    extras, more, options = install_target(installs[0])
    assert extras == want_extras, extras
    assert "-c constraints.txt" in options, "not constrained by constraints.txt"
    # nothing that would swap the pinned set: no other index (a CPU torch), no upgrades
    for o in options:
        assert not o.startswith(("--index-url", "--extra-index-url", "-i", "-U", "--upgrade"))
        assert not o.startswith(("--pre", "--no-deps"))
    for r in more:
        req = Requirement(r)
        assert not req.specifier, f"{r}: pin it in constraints.txt, not here"
        assert canonicalize_name(req.name) in pins, f"{r} is not in constraints.txt"
    # pyproject's own pins agree with constraints.txt, so `-c` changes none of them
    project = PYPROJECT["project"]
    for r in project["dependencies"] + [
        x for e in extras for x in project["optional-dependencies"][e]
    ]:
        req = Requirement(r)
        pin = pins.get(canonicalize_name(req.name))
        assert pin, f"{req.name} is not pinned in constraints.txt"
        assert req.specifier.contains(pin, prereleases=True), (r, pin)
    # every package of the image is pinned, and the forbidden ones are not there
    dists = closure(extras, more)
    unpinned = sorted(d for d in dists if d not in pins and d != "setuptools")
    assert not unpinned, f"not pinned in constraints.txt: {unpinned}"
    assert not dists & forbidden, dists & forbidden
    if dockerfile == OPERATOR:
        assert {"kopf", "kubernetes", "prometheus-client", "boto3"} <= dists
        assert not [d for d in dists if d.startswith(("nvidia-", "cuda-"))]
    else:
        # torch from PyPI is the CUDA build: its CUDA libraries are in the pinned set
        assert {"torch", "ray", "nvidia-cudnn-cu13", "nvidia-nccl-cu13"} <= dists
        assert "+cpu" not in pins["torch"]
