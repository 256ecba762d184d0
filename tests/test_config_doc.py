"""docs/config.md is generated from the config dataclasses: it must list every key and match the code."""

from pathlib import Path

from byztrain.config import FIELD_DOCS, Config, config_fields, config_reference

DOC = Path(__file__).resolve().parents[1] / "docs" / "config.md"


def test_every_config_key_has_a_meaning_and_no_stale_ones():
    keys = [key for key, _, _ in config_fields()]
    missing = [k for k in keys if k not in FIELD_DOCS]
    stale = [k for k in FIELD_DOCS if k not in keys]
    assert not missing, f"add these keys to FIELD_DOCS in src/byztrain/config.py: {missing}"
    assert not stale, f"FIELD_DOCS documents keys the config no longer has: {stale}"


def test_config_fields_are_the_leaves_of_the_default_config():
    def leaves(data, prefix=""):
        for k, v in data.items():
            if isinstance(v, dict) and k not in ("params",):
                yield from leaves(v, f"{prefix}{k}.")
            else:
                yield f"{prefix}{k}", v

    assert [(k, d) for k, _, d in config_fields()] == list(leaves(Config().to_dict()))


def test_docs_config_md_matches_the_code():
    assert DOC.read_text() == config_reference(), "docs/config.md is out of date: run `make docs`"


def test_reference_lists_every_key_with_its_default_and_choices():
    text = config_reference()
    for key, _, _ in config_fields():
        assert f"| `{key}` |" in text
    assert "| `train.lr` | number | `0.05` | number > 0 |" in text
    assert "| `task.split` | string | `iid` | `iid`, `dirichlet`, `gamma_similarity`, `extreme` |" in text
    row = next(line for line in text.splitlines() if line.startswith("| `defense.name` |"))
    for name in ("mean", "btard", "krum", "cclip_ps"):
        assert f"`{name}`" in row
    assert "| `sign_flip` | `scale` | a finite number | `-1000` | factor on the true gradient |" in text
