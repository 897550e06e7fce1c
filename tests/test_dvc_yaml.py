"""dvc.yaml declares everything each stage uses: the classic stale-output bug, caught here.

For every resolved stage (foreach expanded by DVC itself):
- every project module the stage's module imports, transitively (including imports inside
  functions), is a dep — so editing a helper re-runs the stages that use it;
- every params key the stage reads (its module's ``PARAMS`` templates, the only way
  ``stages.common.params.read_section`` reads them) is covered by its ``params:``;
- every path the command writes (``--out``, ``--json-dir``, ``--rejects``, ``--log``,
  ``--cache-dir``) is an out and ``--metrics`` is a metric: nothing is written outside declared
  outs;
- and the converse, which costs money when it fails: editing one stage's schema, or a helper a
  stage does not import, leaves that stage up to date (``dvc status`` in a temp project).
"""
from __future__ import annotations

import ast
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from dvc.repo import Repo

ROOT = Path(__file__).resolve().parents[1]
DVC = str(Path(sys.executable).parent / "dvc")
OUTPUT_FLAGS = ("--out", "--json-dir", "--rejects", "--log", "--cache-dir", "--conversations")


def module_path(root: Path, module: str) -> Path | None:
    base = root.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def project_imports(root: Path, module: str) -> set[Path]:
    """Files of the ``stages`` package that ``module`` needs at run time, transitively,
    including the package ``__init__`` files Python executes on the way."""
    seen: set[Path] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        parts = name.split(".")
        for i in range(1, len(parts) + 1):  # stages/__init__.py, stages/common/__init__.py …
            path = module_path(root, ".".join(parts[:i]))
            if path is None or path in seen:
                continue
            seen.add(path)
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.Import):
                    todo += [a.name for a in node.names if a.name.split(".")[0] == "stages"]
                elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0 \
                        and node.module.split(".")[0] == "stages":
                    todo.append(node.module)
                    # `from stages.sources import hub` imports a submodule
                    todo += [f"{node.module}.{a.name}" for a in node.names
                             if module_path(root, f"{node.module}.{a.name}")]
    return seen


def declared_params_of(root: Path, module: str) -> tuple[str, ...]:
    tree = ast.parse(module_path(root, module).read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
                isinstance(t, ast.Name) and t.id == "PARAMS" for t in node.targets):
            return tuple(ast.literal_eval(node.value))
    raise AssertionError(f"{module} has no module-level PARAMS constant")


def covered(key: str, declared: set[str]) -> bool:
    return any(key == d or key.startswith(d + ".") for d in declared)


def check_declarations(root: Path) -> list[str]:
    """Problems in ``root``'s dvc.yaml; empty when every stage declares what it uses."""
    problems = []
    with Repo(str(root)) as repo:
        stages = list(repo.index.stages)
    for stage in stages:
        name = stage.addressing
        argv = shlex.split(stage.cmd)
        if argv[:2] != ["python", "-m"] or not argv[2].startswith("stages."):
            problems.append(f"{name}: cmd must be `python -m stages.<module> ...`")
            continue
        module, key = argv[2], name.split("@", 1)[1] if "@" in name else None
        if module_path(root, module) is None:
            problems.append(f"{name}: module {module} does not exist")
            continue
        deps = {d.def_path for d in stage.deps if type(d).__name__ == "Dependency"}
        params = {p for d in stage.deps if type(d).__name__ == "ParamsDependency"
                  for p in (d.params or [])}
        for path in sorted(project_imports(root, module)):
            rel = path.relative_to(root).as_posix()
            if rel not in deps:
                problems.append(f"{name}: imports {rel} but it is not in deps")
        for template in declared_params_of(root, module):
            wanted = template.format(key=key)
            if not covered(wanted, params):
                problems.append(f"{name}: reads params {wanted} but it is not in params")
        outs = {o.def_path for o in stage.outs if not o.metric}
        metrics = {o.def_path for o in stage.outs if o.metric}
        for flag, value in zip(argv, argv[1:]):
            if flag in OUTPUT_FLAGS and value not in outs:
                problems.append(f"{name}: writes {value} ({flag}) but it is not an out")
            if flag == "--metrics" and value not in metrics:
                problems.append(f"{name}: writes {value} (--metrics) but it is not a metric")
    return problems


def test_every_stage_declares_its_modules_params_and_outputs():
    assert check_declarations(ROOT) == []


def test_dvc_vars_is_derived_from_params():
    from stages.dvc_vars import is_current
    assert is_current(ROOT), "dvc.vars.yaml is out of date: run `python -m stages.dvc_vars`"


def _stage_imports(path: Path) -> set[str]:
    """Every ``stages.…`` module ``path`` imports, anywhere in it (function bodies too)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return {n for n in names if n.split(".")[0] == "stages"}


def test_common_imports_no_stage_and_no_module_imports_one_that_imports_it_back():
    """The common core imports nothing above it (not even the source loaders), and its
    modules form no circle (llm.py and llm_batch.py once imported each other)."""
    common = {f"stages.common.{p.stem}": _stage_imports(p) for p in (ROOT / "stages" / "common").glob("*.py")}
    for module, imports in common.items():
        assert all(name.startswith("stages.common") for name in imports), (module, imports)

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        for name in common.get(start, ()):
            if name == goal or (name not in seen and reaches(name, goal, seen | {name})):
                return True
        return False
    circles = [m for m in common if reaches(m, m, {m})]
    assert circles == [], circles


def test_every_stage_module_exists_and_has_params():
    with Repo(str(ROOT)) as repo:
        modules = {shlex.split(s.cmd)[2] for s in repo.index.stages}
    assert {"stages.collect", "stages.extract"} <= modules
    for module in modules:
        assert declared_params_of(ROOT, module)


@pytest.fixture()
def copy_of_project(tmp_path: Path) -> Path:
    dst = tmp_path / "proj"
    shutil.copytree(ROOT, dst, ignore=shutil.ignore_patterns(
        ".venv", "quickstart", ".git", "data", "__pycache__", ".dvc"))
    subprocess.run(["git", "init", "-q"], cwd=dst, check=True)
    subprocess.run([DVC, "init", "-q"], cwd=dst, check=True)
    return dst


def test_check_catches_a_missing_module_dep(copy_of_project: Path):
    dvc_yaml = copy_of_project / "dvc.yaml"
    text = dvc_yaml.read_text(encoding="utf-8")
    dvc_yaml.write_text(text.replace("        - stages/common/text.py\n", "", 1), encoding="utf-8")
    problems = check_declarations(copy_of_project)
    assert any("imports stages/common/text.py but it is not in deps" in p for p in problems)


def test_check_catches_an_undeclared_param(copy_of_project: Path):
    collect = copy_of_project / "stages" / "collect.py"
    text = collect.read_text(encoding="utf-8")
    collect.write_text(text.replace('PARAMS = ("collect.{key}",)',
                                    'PARAMS = ("collect.{key}", "tokenizer.name")'), encoding="utf-8")
    problems = check_declarations(copy_of_project)
    assert any("reads params tokenizer.name" in p for p in problems)


def test_check_catches_an_undeclared_output(copy_of_project: Path):
    dvc_yaml = copy_of_project / "dvc.yaml"
    text = dvc_yaml.read_text(encoding="utf-8")
    dvc_yaml.write_text(text.replace("        - data/rejects/collect/${key}.parquet\n", "", 1),
                        encoding="utf-8")
    problems = check_declarations(copy_of_project)
    assert any("(--rejects) but it is not an out" in p for p in problems)


# ---------------------------------------------------------------------------- coupling
def _project_with_a_lock(tmp_path: Path) -> Path:
    """A git + DVC copy of the project whose dvc.lock records train@* and evaluate@* as up to
    date: their deps and outs are stand-in files, committed with ``dvc commit``."""
    dst = tmp_path / "proj"
    shutil.copytree(ROOT, dst, ignore=shutil.ignore_patterns(
        ".venv", "quickstart", ".git", "data", "__pycache__", ".dvc", "models", "metrics"))
    subprocess.run(["git", "init", "-q"], cwd=dst, check=True)
    subprocess.run([DVC, "init", "-q"], cwd=dst, check=True)
    with Repo(str(dst)) as repo:
        stages = [s for s in repo.index.stages if s.name.split("@")[0] in ("train", "evaluate")]
        for stage in stages:
            for item in [*stage.deps, *stage.outs]:
                if type(item).__name__ == "ParamsDependency":
                    continue
                path = dst / item.def_path
                if path.exists():
                    continue
                if item.def_path.startswith(("models/", "checkpoints/", "dvclive/")) or \
                        item.def_path.endswith("eval"):
                    path.mkdir(parents=True, exist_ok=True)
                    (path / "stand-in.txt").write_text(item.def_path, encoding="utf-8")
                else:
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.write_text(item.def_path, encoding="utf-8")
    names = [s.name for s in stages]
    subprocess.run([DVC, "commit", "-f", "-q", *names], cwd=dst, check=True)
    return dst


def _stale(project: Path) -> set[str]:
    out = subprocess.run([DVC, "status", "--json"], cwd=project, check=True,
                         capture_output=True, text=True).stdout
    import json
    return {name for name in json.loads(out or "{}")
            if name.split("@")[0] in ("train", "evaluate")}


@pytest.mark.slow
def test_editing_another_stages_schema_or_helper_leaves_training_up_to_date(tmp_path):
    project = _project_with_a_lock(tmp_path)
    assert _stale(project) == set()
    # another stage's schema (a field description) and helpers train does not import
    for rel, old, new in (
            ("stages/mixing/recipe.py", "records become examples", "records become training examples"),
            ("stages/extract.py", "processes; 0 = one per core", "worker processes; 0 = one per core"),
            ("stages/common/llm.py", "requests in flight at most", "requests in flight, at most"),
            ("stages/mixing/hashing.py", "Vectorised hashing", "Vectorised (numpy) hashing")):
        path = project / rel
        text = path.read_text(encoding="utf-8")
        assert old in text, rel
        path.write_text(text.replace(old, new), encoding="utf-8")
    assert _stale(project) == set()
    # the control: an edit to train's own schema does make every train@ (and nothing else) stale
    path = project / "stages/train.py"
    text = path.read_text(encoding="utf-8")
    path.write_text(text.replace("resume from the last complete checkpoint",
                                 "resume from the newest complete checkpoint"), encoding="utf-8")
    assert _stale(project) == {f"train@{v}" for v in ("v1", "v2", "v3", "v4", "v5_1", "v5_2",
                                                       "v5_3", "v6", "v7")}
