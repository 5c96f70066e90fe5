"""The one comma-list parser of CLI options and config overrides (`astrolom.config.comma_list`)."""

from __future__ import annotations

import pytest

from astrolom import cli
from astrolom.config import comma_list


def test_comma_list_strips_drops_empties_and_converts():
    assert comma_list(" g, r ,,z ") == ("g", "r", "z")
    assert comma_list("4,16,64", int) == (4, 16, 64)
    assert comma_list("0.8,0.1,0.1", float) == (0.8, 0.1, 0.1)
    assert comma_list("") == ()
    with pytest.raises(ValueError, match=r"^--outlier-k: '4,x' is not a comma-separated list of int"):
        comma_list("4,x", int, "--outlier-k")


def test_a_bad_list_option_is_a_clear_cli_error(tmp_path, capsys):
    code = cli.main(["index", "--embeddings", str(tmp_path / "e.parquet"), "--out", str(tmp_path / "i"),
                     "--outlier-k", "10,ten"])  # fmt: skip
    assert code != 0
    assert "--outlier-k: '10,ten' is not a comma-separated list of int" in capsys.readouterr().err
