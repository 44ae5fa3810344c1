"""The conda environment and pyproject.toml must ask for the same versions."""
import re
import sys

from conftest import ROOT

CONDA_NAMES = {"torch": "pytorch"}  # conda-forge's name for the same package


def pyproject_deps() -> dict[str, str]:
    if sys.version_info >= (3, 11):
        import tomllib
        deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    else:  # 3.10: read the dependencies list by hand
        block = re.search(r"dependencies = \[(.*?)\]", (ROOT / "pyproject.toml").read_text(), re.S).group(1)
        deps = re.findall(r'"([^"]+)"', block)
    out = {}
    for d in deps:
        name, spec = re.match(r"([A-Za-z0-9_.-]+)\s*(.*)", d).groups()
        out[name.lower()] = spec.replace(" ", "")
    return out


def conda_deps() -> dict[str, str]:
    out = {}
    for line in (ROOT / "environment.yml").read_text().splitlines():
        m = re.match(r"\s+-\s+([A-Za-z0-9_.-]+)\s*([<>=!,.0-9]*)\s*$", line)
        if m:
            out[m.group(1).lower()] = m.group(2)
    return out


def test_environment_pins_agree_with_pyproject():
    conda = conda_deps()
    deps = pyproject_deps()
    assert set(deps) >= {"torch", "torchvision", "submitit", "h5py", "numpy", "matplotlib", "rich"}
    for name, spec in deps.items():
        conda_name = CONDA_NAMES.get(name, name)
        assert conda_name in conda, f"{conda_name} is in pyproject.toml but not in environment.yml"
        assert conda[conda_name] == spec, f"{name}: pyproject {spec!r} vs environment.yml {conda[conda_name]!r}"


def test_pins_admit_both_supported_torch_setups():
    from packaging.specifiers import SpecifierSet
    deps = pyproject_deps()
    for torch_v, tv_v in (("2.14.1", "0.29.1"), ("2.11.0", "0.26.0")):
        assert torch_v in SpecifierSet(deps["torch"]) and tv_v in SpecifierSet(deps["torchvision"])


def test_installed_versions_satisfy_pins():
    from importlib.metadata import version

    from packaging.specifiers import SpecifierSet
    for name, spec in pyproject_deps().items():
        assert version(name).split("+")[0] in SpecifierSet(spec), f"{name} {version(name)} outside {spec}"
