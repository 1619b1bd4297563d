import pytest


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """One kanji render cache for the whole test session (each size renders once, ~3 s)."""
    return str(tmp_path_factory.mktemp("data"))
