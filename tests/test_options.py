"""Each setting is declared once (a dataclass field with its help text); the command line's flags and the
README's option table are made from the fields, and checked against them here."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from cli import build_parser
from lsun_hitl.config import CascadeParams, ConfigError, IngestParams, ModelParams
from lsun_hitl.options import INGEST, TABLES, ingest_params_from_args, options, params_from_args, readme_block

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.mark.parametrize("table", list(TABLES))
def test_the_readme_option_tables_are_the_settings_tables(table):
    text = README.read_text()
    assert readme_block(table) in text, (
        f"README's {table} table is stale: python -m lsun_hitl.options --readme README.md"
    )


def test_every_setting_has_help_and_one_flag():
    opts = options()
    names = {o.name for o in opts}
    fields = {f.name for f in dataclasses.fields(CascadeParams)} | {f.name for f in dataclasses.fields(ModelParams)}
    assert names == fields - {"model", "model_schedule"}
    assert all(o.help for o in opts), [o.name for o in opts if not o.help]
    flags = [o.flag for o in opts if o.flag]
    assert len(flags) == len(set(flags))


@pytest.mark.parametrize("command", ["run", "demo", "simulate"])
def test_flags_reach_their_fields(command):
    parser = build_parser()
    base = [command, "--category", "bag"]
    assert params_from_args(parser.parse_args(base)) == CascadeParams()
    for o in options():
        if o.flag is None:
            continue
        default = getattr(CascadeParams() if o.owner is CascadeParams else ModelParams(), o.name)
        if o.kind is bool:
            argv, want = [o.flag_for(default)], not default
        elif o.choices:
            want = next(c for c in o.choices if c != default)
            argv = [f"--{o.flag}", want]
        else:
            want = o.kind(7) if default is None else o.kind(default) + o.kind(1) if o.kind is not str else "x.pt"
            argv = [f"--{o.flag}", str(want)]
        params = params_from_args(parser.parse_args([*base, *argv]))
        got = getattr(params if o.owner is CascadeParams else params.model, o.name)
        assert got == want, (o.flag, got, want)


def test_ingest_flags_reach_their_fields_and_a_bad_value_is_refused():
    parser = build_parser()
    base = ["ingest", "--images", "somewhere/"]
    assert ingest_params_from_args(parser.parse_args(base)) == IngestParams()
    assert {o.name for o in options(INGEST)} == {f.name for f in dataclasses.fields(IngestParams)}
    assert all(o.help for o in options(INGEST))
    params = ingest_params_from_args(parser.parse_args([*base, "--max-image-pixels", "144000000"]))
    assert params == IngestParams(max_image_pixels=144_000_000) == params.validate()
    with pytest.raises(ConfigError, match="max_image_pixels = 0 cannot work"):
        ingest_params_from_args(parser.parse_args([*base, "--max-image-pixels", "0"])).validate()
