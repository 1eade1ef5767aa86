"""The user's project (quant/project.py): where its matrix, baselines and reports are, and the cache folder."""
import pytest

from quant.config import ConfigError
from quant.project import BASELINES_ENV, CACHE_DIR_ENV, MATRIX_ENV, Project, cache_dir


@pytest.fixture(autouse=True)
def no_overrides(monkeypatch):
    for name in (MATRIX_ENV, CACHE_DIR_ENV, BASELINES_ENV, "XDG_CACHE_HOME"):
        monkeypatch.delenv(name, raising=False)


def test_the_matrix_comes_from_the_flag_then_the_environment_then_pyproject(tmp_path, monkeypatch):
    (tmp_path / "pyproject.toml").write_text('[tool.quant]\nmatrix = "gates/quant.yaml"\n')
    project = Project.at(tmp_path)
    assert project.matrix() == tmp_path / "gates" / "quant.yaml"
    monkeypatch.setenv(MATRIX_ENV, str(tmp_path / "env.yaml"))
    assert project.matrix() == tmp_path / "env.yaml"
    assert project.matrix("flag.yaml").name == "flag.yaml"


def test_a_project_is_found_from_a_subfolder_and_owns_its_outputs(tmp_path, monkeypatch):
    (tmp_path / "pyproject.toml").write_text('[tool.quant]\nmatrix = "quant.yaml"\n')
    (tmp_path / "src" / "deep").mkdir(parents=True)
    project = Project.find(tmp_path / "src" / "deep")
    assert project.root == tmp_path.resolve()
    assert (project.reports, project.baselines, project.benchmarks) == (
        tmp_path.resolve() / "reports", tmp_path.resolve() / "baselines", tmp_path.resolve() / ".benchmarks")
    monkeypatch.setenv(BASELINES_ENV, str(tmp_path / "elsewhere"))
    assert project.baselines == (tmp_path / "elsewhere").resolve()


def test_no_matrix_says_where_it_looked(tmp_path):
    with pytest.raises(ConfigError, match=f"no matrix found: looked at --matrix, \\${MATRIX_ENV} and \\[tool.quant\\] "
                                          f"matrix in {tmp_path.resolve() / 'pyproject.toml'}"):
        Project.find(tmp_path).require_matrix()
    with pytest.raises(ConfigError, match="the matrix must be a YAML file, not a folder"):
        Project.find(tmp_path).require_matrix(tmp_path)


@pytest.mark.parametrize("text,message", [
    ('[tool.quant]\nmatrx = "quant.yaml"\n', r"\[tool.quant\] has unknown field\(s\) \['matrx'\]"),
    ("[tool.quant]\nmatrix = 3\n", r"\[tool.quant\] matrix = 3: must be a path in quotes"),
    ("[tool.quant\n", "not valid TOML"),
])
def test_a_wrong_tool_quant_table_names_the_file_and_field(tmp_path, text, message):
    (tmp_path / "pyproject.toml").write_text(text)
    with pytest.raises(ConfigError, match=f"{tmp_path / 'pyproject.toml'}: {message}"):
        Project.at(tmp_path)


def test_the_cache_is_the_variable_else_the_users_cache_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == (tmp_path / "home" / ".cache" / "quant").resolve()
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == (tmp_path / "xdg" / "quant").resolve()
    monkeypatch.setenv(CACHE_DIR_ENV, str(tmp_path / "mine"))
    assert cache_dir() == (tmp_path / "mine").resolve()
    (tmp_path / "file").write_text("")
    monkeypatch.setenv(CACHE_DIR_ENV, str(tmp_path / "file"))
    with pytest.raises(ConfigError, match=f"\\${CACHE_DIR_ENV} points at .*file, which is a file"):
        cache_dir()
