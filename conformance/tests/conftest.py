from __future__ import annotations

import importlib.metadata
import shutil
import tempfile

import pytest


def _plugin_installed() -> bool:
    return any(
        ep.name == "gradaccum_conformance"
        for ep in importlib.metadata.entry_points(group="pytest11")
    )


# Installed, the plugin loads through its pytest11 entry point; from a source
# checkout (PYTHONPATH=conformance/src) it is loaded here.
PLUGIN_ARGS: list[str] = [] if _plugin_installed() else ["-p", "gradaccum_conformance.plugin"]
pytest_plugins = ["pytester"] + ([] if _plugin_installed() else ["gradaccum_conformance.plugin"])

_OWN_BASETEMP = pytest.StashKey[str]()


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    # pytest keeps only the 3 newest /tmp/pytest-of-<user>/pytest-N folders and
    # deletes older ones, even while another session still uses them; with
    # several sessions running at once that removed our pytester folders
    # mid-run. A private basetemp (unless one is given) cannot be collected.
    if config.option.basetemp is None:
        path = tempfile.mkdtemp(prefix="gradaccum-conformance-tests-")
        config.option.basetemp = path
        config.stash[_OWN_BASETEMP] = path


def pytest_unconfigure(config: pytest.Config) -> None:
    path = config.stash.get(_OWN_BASETEMP, None)
    if path is not None:
        shutil.rmtree(path, ignore_errors=True)
