"""Project hygiene: install pins agree, notebooks are committed clean, CI calls the README command."""

import json
import re
import tomllib
from pathlib import Path

import pytest
import yaml

from calibkit.tutorial.runner import list_notebooks

ROOT = Path(__file__).resolve().parent.parent
PINS = {"torch": "2.14.1", "torchvision": "0.29.1", "onnx": "1.23.2", "onnxruntime": "1.32.0"}


def _pins(requirements):
    out = {}
    for req in requirements:
        m = re.fullmatch(r"\s*([A-Za-z0-9_.\-]+)\s*==\s*([^\s;]+)\s*", req)
        if m:
            out[m.group(1).lower()] = m.group(2)
    return out


def test_pyproject_pins_torch_exactly():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for name, version in PINS.items():
        assert _pins(project["dependencies"]).get(name) == version, name
    extras = project["optional-dependencies"]
    wanted = {"jupyterlab", "ipywidgets", "papermill", "ipykernel", "pytest", "hypothesis"}
    listed = {re.split(r"[<>=\[ ]", r)[0].lower() for group in extras.values() for r in group} | {
        re.split(r"[<>=\[ ]", r)[0].lower() for r in project["dependencies"]}
    assert wanted <= listed, wanted - listed
    assert {"matplotlib", "tqdm"} <= listed


def test_environment_yml_parses_and_matches_pins():
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    deps = env["dependencies"]
    assert "python=3.11" in deps
    pip_section = next(d["pip"] for d in deps if isinstance(d, dict) and "pip" in d)
    assert _pins(pip_section) == PINS
    assert any(line.startswith("-e .[") for line in pip_section), "environment.yml must install the package with its extras"


def test_notebooks_exist():
    assert list_notebooks(), "no notebooks found in notebooks/"


@pytest.mark.parametrize("nb_path", list_notebooks(), ids=lambda p: p.name)
def test_notebook_is_committed_clean(nb_path):
    nb = json.loads(nb_path.read_text())
    assert nb["metadata"]["kernelspec"]["name"] == "python3"
    code_cells = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert code_cells, "notebook has no code"
    assert "parameters" in code_cells[0].get("metadata", {}).get("tags", []), "first code cell must be tagged 'parameters'"
    for cell in code_cells:
        assert cell.get("outputs", []) == [], "notebooks are committed without outputs"
        assert cell.get("execution_count") is None, "notebooks are committed without execution counts"
    params = "".join(code_cells[0]["source"])
    assert re.search(r"^profile\s*=", params, re.M), "every notebook takes a `profile` parameter"
    assert re.search(r"^output_dir\s*=", params, re.M), "every notebook takes an `output_dir` parameter"


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in readme and "make tutorial" in readme
    assert re.search(r"^make test\b", ci, re.M), ".ci/run must call the README's test command"


def test_summary_keeps_notebooks_that_were_not_rerun(tmp_path):
    import json

    from calibkit.tutorial.runner import update_summary

    path = tmp_path / "summary.json"
    first = [{"notebook": n, "seconds": 1.0, "metrics": {"a": i}} for i, n in enumerate(["01_x.ipynb", "02_y.ipynb"])]
    update_summary(path, first)
    got = update_summary(path, [{"notebook": "02_y.ipynb", "seconds": 5.0, "metrics": {"a": 9}}])  # --only 02
    assert list(got) == ["01_x.ipynb", "02_y.ipynb"] and got["02_y.ipynb"]["metrics"] == {"a": 9}
    assert json.loads(path.read_text()) == got and got["01_x.ipynb"]["seconds"] == 1.0
    path.write_text("not json")
    assert list(update_summary(path, first[:1])) == ["01_x.ipynb"]


def _github_anchor(heading: str) -> str:
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _doc_anchors() -> set[str]:
    text = (ROOT / "docs" / "methods.md").read_text()
    return {_github_anchor(m.group(1)) for m in re.finditer(r"^#{1,6}\s+(.+)$", text, re.M)}


def _project_texts():
    for path in [*ROOT.glob("calibkit/**/*.py"), *ROOT.glob("notebooks/*.ipynb"), ROOT / "README.md",
                 *ROOT.glob("benchmarks/*.py")]:
        yield path, path.read_text()


def test_method_links_point_at_existing_sections():
    """Docstrings and notebooks cite the project's own reference, docs/methods.md, by section anchor."""
    anchors = _doc_anchors()
    links = [(p.relative_to(ROOT), a) for p, text in _project_texts()
             for a in re.findall(r"methods\.md#([\w\-]+)", text)]
    assert len(links) >= 20, "the code and notebooks link docs/methods.md"
    missing = [(str(p), a) for p, a in links if a not in anchors]
    assert not missing, f"links to sections docs/methods.md does not have: {missing}"


def test_no_citations_of_a_document_the_repository_does_not_hold():
    stale = [str(p.relative_to(ROOT)) for p, text in _project_texts() if re.search(r"spec sections? \d", text)]
    assert not stale, f"these cite 'spec section N' instead of docs/methods.md: {stale}"


@pytest.mark.parametrize("nb_path", list_notebooks(), ids=lambda p: p.name)
def test_parameter_cell_holds_values_only(nb_path):
    """papermill overrides the first cell: it holds plain assignments of literal values, no logic."""
    import ast

    nb = json.loads(nb_path.read_text())
    params = "".join(next(c for c in nb["cells"] if c["cell_type"] == "code")["source"])
    for stmt in ast.parse(params).body:
        assert isinstance(stmt, ast.Assign) and all(isinstance(t, ast.Name) for t in stmt.targets), \
            f"{nb_path.name}: the parameters cell holds only `name = value` lines: {ast.unparse(stmt)!r}"
        ast.literal_eval(stmt.value)  # raises ValueError for anything but a literal


def test_interactive_parameters_fill_only_what_is_left_open(monkeypatch):
    from calibkit.tutorial.runner import interactive_parameters

    for var in ("CALIBKIT_PROFILE", "CALIBKIT_OUTPUT_ROOT", "CALIBKIT_LIVE_WIDGETS"):
        monkeypatch.delenv(var, raising=False)
    assert interactive_parameters("03_x") == ("full", "../outputs/full/03_x", "../outputs/full/01_train_float/model.pt", True)
    monkeypatch.setenv("CALIBKIT_PROFILE", "smoke")
    monkeypatch.setenv("CALIBKIT_OUTPUT_ROOT", "/tmp/o")
    monkeypatch.setenv("CALIBKIT_LIVE_WIDGETS", "false")
    assert interactive_parameters("03_x") == ("smoke", "/tmp/o/03_x", "/tmp/o/01_train_float/model.pt", False)
    # papermill's values win over the environment
    assert interactive_parameters("03_x", "full", "out", "ck.pt", True) == ("full", "out", "ck.pt", True)


# A split read from an image folder is sorted by class: its first n images may hold one or two classes (the first
# 2000 CIFAR-10 test images are airplanes and automobiles), so evaluation subsets are drawn with balanced_subset.
SLICED_SUBSET = re.compile(r"\b(?:val|slider|holdout|test)_(?:images|labels)\[:\s*[A-Za-z_]")


def test_evaluation_subsets_are_drawn_not_sliced():
    sources = {p: "".join("".join(c["source"]) for c in json.loads(p.read_text())["cells"]) for p in list_notebooks()}
    sources |= {p: p.read_text() for p in (ROOT / "calibkit").rglob("*.py")}
    sliced = {str(p.relative_to(ROOT)): SLICED_SUBSET.findall(s) for p, s in sources.items() if SLICED_SUBSET.search(s)}
    assert not sliced, f"a sized slice of a class-sorted split (use calibkit.cifar.images.balanced_subset): {sliced}"
