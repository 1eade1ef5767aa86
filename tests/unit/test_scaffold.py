"""quant init (quant/scaffold.py): a starting matrix that loads, its [tool.quant] entry, a GPU workflow; nothing that
exists is overwritten."""
import pytest
import yaml

from quant.cli import main
from quant.matrix import load_matrix
from quant.project import Project


def test_init_starts_a_project_whose_matrix_loads(tmp_path, capsys):
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "team"\n')
    assert main(["init", str(tmp_path)]) == 0
    project = Project.at(tmp_path)
    assert project.matrix() == tmp_path / "quant.yaml"
    assert (tmp_path / "pyproject.toml").read_text().startswith('[project]\nname = "team"\n')
    matrix = load_matrix(project.matrix())
    assert [case.id for case in matrix.cases] == ["smollm2-135m-rtn-w4g128-wikitext"]
    first = (tmp_path / "quant.yaml").read_text().splitlines()[0]
    assert first.startswith("# yaml-language-server: $schema=file://") and first.endswith("/quant/matrix.schema.json")
    workflow = yaml.safe_load((tmp_path / ".github" / "workflows" / "quant-gpu.yml").read_text())
    steps = workflow["jobs"]["quant-gate"]["steps"]
    assert any("pytest -m gpu" in step.get("run", "") for step in steps)


@pytest.mark.parametrize("existing", ["quant.yaml", ".github/workflows/quant-gpu.yml", "pyproject.toml"])
def test_init_overwrites_nothing(tmp_path, capsys, existing):
    path = tmp_path / existing
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text('[tool.quant]\nmatrix = "mine.yaml"\n' if existing == "pyproject.toml" else "mine\n")
    before = path.read_text()
    assert main(["init", str(tmp_path)]) == 2
    assert f"quant init overwrites nothing, and these exist: {path}" in capsys.readouterr().err
    assert path.read_text() == before
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == [path.name]
