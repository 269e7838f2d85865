"""The layout stays easy to see: no import cycles, late imports say why, the architecture page
names only modules that exist, and every default is written once (conf/ agrees with the schema)."""

from __future__ import annotations

import ast
import dataclasses
import re
from pathlib import Path

import pytest
import yaml

from harness.config import (
    AnalyzeConfig,
    Config,
    DatasetConfig,
    DeployConfig,
    GoalConfig,
    ModelConfig,
    PruneConfig,
    TrackingConfig,
    TrainConfig,
    plain,
)

from .conftest import REPO

PACKAGES = ("harness", "hydra_plugins")
# None left: the LPOT modules became one package (harness/lpot/) that imports the engine, never the reverse.
KNOWN_CYCLES: list[set[str]] = []


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (REPO / package).rglob("*.py"):
            parts = path.relative_to(REPO).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[name] = path
    return found


def _type_checking_only(tree: ast.Module) -> set[int]:
    """Line numbers of imports under ``if TYPE_CHECKING:`` (never run, so never a cycle)."""
    lines = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            lines |= {n.lineno for child in node.body for n in ast.walk(child) if hasattr(n, "lineno")}
    return lines


def _lazy_exports(path: Path) -> dict[str, str]:
    """A package's ``_EXPORTS = {"Name": "module"}`` table (harness.pruning loads names on first use)."""
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "_EXPORTS" for t in node.targets):
            return ast.literal_eval(node.value)
    return {}


def _imports(name: str, path: Path, modules: dict[str, Path]) -> list[tuple[str, ast.stmt, bool]]:
    """(imported project module, the import statement, whether it runs inside a function)."""
    tree = ast.parse(path.read_text())
    skip = _type_checking_only(tree)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    inside: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            inside |= {n.lineno for n in ast.walk(node) if isinstance(n, ast.Import | ast.ImportFrom)}
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Import | ast.ImportFrom) or node.lineno in skip:
            continue
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        else:
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            exports = _lazy_exports(modules[base]) if base in modules else {}
            targets = []
            for alias in node.names:
                if f"{base}.{alias.name}" in modules:
                    targets.append(f"{base}.{alias.name}")
                elif alias.name in exports:
                    targets.append(f"{base}.{exports[alias.name]}")
                else:
                    targets.append(base)
        found += [(t, node, node.lineno in inside) for t in targets if t in modules and t != name]
    return found


def _cycles(graph: dict[str, set[str]]) -> list[set[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    result = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                result.append(component)

    for v in graph:
        if v not in index:
            visit(v)
    return result


def test_no_import_cycles_between_the_projects_modules():
    modules = _modules()
    graph = {name: {t for t, _, _ in _imports(name, path, modules)} for name, path in modules.items()}
    assert "harness.runner" in graph["harness.__main__"]  # the scan sees late imports too
    cycles = [c for c in _cycles(graph) if c not in KNOWN_CYCLES]
    assert not cycles, f"import cycles: {[sorted(c) for c in cycles]}"


def test_a_late_import_of_a_project_module_says_why():
    """Imports sit at the top of modules; one inside a function needs a comment saying why (start-up time)."""
    modules = _modules()
    unexplained = []
    for name, path in modules.items():
        if name in ("harness.bench",) or name in set().union(*KNOWN_CYCLES):
            continue
        lines = path.read_text().splitlines()
        for _, node, late in _imports(name, path, modules):
            if late and not _commented(lines, node.lineno - 1):
                unexplained.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert not unexplained, f"imports inside functions without a reason: {unexplained}"


def _commented(lines: list[str], i: int) -> bool:
    """A comment on line ``i``, or above it across the import lines of the same group."""
    while i >= 0:
        text = lines[i].strip()
        if "#" in text:
            return True
        if not text.startswith(("from ", "import ")):
            return False
        i -= 1
    return False


def test_the_architecture_page_names_only_modules_that_exist():
    page = (REPO / "docs" / "architecture.md").read_text()
    paths = set(re.findall(r"`((?:harness|hydra_plugins|tests|conf|sweeps)/[\w/.-]*)`", page))
    dotted = set(re.findall(r"`(harness(?:\.\w+)+)`", page))
    assert len(paths) + len(dotted) > 20, "the page names the modules it describes"
    missing = [p for p in paths if not (REPO / p).exists()]
    modules = _modules()
    missing += [d for d in dotted if d not in modules and d.rpartition(".")[0] not in modules]
    assert not missing, f"docs/architecture.md names what does not exist: {sorted(missing)}"
    for module in modules:  # and every module of the package is on the page
        short = module.removeprefix("harness.").replace(".", "/")
        if module.startswith("harness.") and not module.endswith("__main__"):
            assert short in page or module in page, f"docs/architecture.md does not mention {module}"


# One source for each default: the dataclasses of harness/config.py. A file under conf/ may restate a
# default (it documents the option), and then must agree with the schema; what an option changes on
# purpose is listed here, so that a changed default cannot leave a stale copy behind.
SCHEMAS = {"train": TrainConfig, "prune": PruneConfig, "tracking": TrackingConfig, "dataset": DatasetConfig,
           "model": ModelConfig, "analyze": AnalyzeConfig, "deploy": DeployConfig}
COMPLETE = {"train/default.yaml", "tracking/mlflow.yaml", "deploy/default.yaml"}  # every field, for reading
CHANGED = {
    "analyze/sensitivity.yaml": {"mode"},
    "dataset/cifar10.yaml": {"name", "root", "val_fraction", "augment"},
    "dataset/fake.yaml": {"name", "train_size", "eval_size"},
    "dataset/imagefolder.yaml": {"name", "root", "image_size", "augment"},
    "model/mlp.yaml": {"name"},
    "model/torchvision.yaml": {"source", "name"},
    "prune/block.yaml": {"pattern"},
    "prune/channel.yaml": {"pattern", "target_sparsity"},
    "prune/nm.yaml": {"pattern", "target_sparsity"},
    "prune/none.yaml": {"enabled"},
    "tracking/none.yaml": {"backend"},
}
GROUP_FILES = sorted(str(p.relative_to(REPO / "conf")) for p in (REPO / "conf").glob("*/*.yaml"))


def test_every_group_file_is_checked():
    assert {f.partition("/")[0] for f in GROUP_FILES} == set(SCHEMAS)
    assert set(CHANGED) | COMPLETE <= set(GROUP_FILES)


@pytest.mark.parametrize("file", GROUP_FILES)
def test_a_config_file_agrees_with_the_schemas_defaults(file):
    schema = SCHEMAS[file.partition("/")[0]]
    values = yaml.safe_load((REPO / "conf" / file).read_text()) or {}
    values.pop("defaults", None)
    defaults = plain(dataclasses.asdict(schema()))
    assert set(values) <= set(defaults), f"conf/{file}: not fields of {schema.__name__}: {set(values) - set(defaults)}"
    if file in COMPLETE:
        assert set(values) == set(defaults), f"conf/{file} lacks {sorted(set(defaults) - set(values))}"
    changed = CHANGED.get(file, set())
    differ = {k: (v, defaults[k]) for k, v in values.items() if k not in changed and v != defaults[k]}
    assert not differ, f"conf/{file} and {schema.__name__} disagree (yaml, dataclass): {differ}"
    same = {k for k in changed if values.get(k) == defaults[k]}
    assert not same, f"conf/{file}: {same} listed as changed but equal to the default"


def test_the_top_level_config_agrees_with_the_schemas_defaults():
    top = yaml.safe_load((REPO / "conf" / "config.yaml").read_text())
    defaults = plain(dataclasses.asdict(Config()))
    assert top["goal"] == plain(dataclasses.asdict(GoalConfig()))
    assert {k: top[k] for k in ("seed", "outputs_dir")} == {k: defaults[k] for k in ("seed", "outputs_dir")}
