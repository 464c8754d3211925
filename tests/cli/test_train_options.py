"""``vitkit train``'s options are generated from TrainConfig: every config field is an option of the
verb or deliberately hidden (``vitkit.verbs.train.HIDDEN``), so a new field cannot be forgotten."""

from __future__ import annotations

from typer.testing import CliRunner

from vitkit.config.train import TrainConfig
from vitkit.verbs import verbs
from vitkit.verbs.train import HIDDEN, OPTION_NAME, config_options


def test_every_train_config_field_is_an_option_or_deliberately_hidden():
    exposed = config_options()
    fields = set(TrainConfig.model_fields)
    missing = fields - set(exposed) - set(HIDDEN)
    assert not missing, (
        f"TrainConfig fields with no `vitkit train` option: expose them or list them in HIDDEN: {missing}"
    )
    assert not set(exposed) & set(HIDDEN), "a hidden field has an option"
    assert set(HIDDEN) <= fields and set(OPTION_NAME) <= fields, (
        "HIDDEN/OPTION_NAME name no TrainConfig field"
    )
    options = verbs()["train"].options.model_fields
    assert all(opt in options for opt in exposed.values())


def test_every_exposed_field_has_its_flag_in_the_help():
    from vitkit.cli import _register, app

    _register()
    out = CliRunner().invoke(app, ["train", "--help"], env={"COLUMNS": "250"})
    assert out.exit_code == 0, out.output
    for opt in config_options().values():
        assert "--" + opt.replace("_", "-") in out.output, opt
    for hidden in HIDDEN:
        assert "--" + hidden.replace("_", "-") not in out.output, hidden


def test_flags_override_the_config_file(tmp_path, monkeypatch):
    """A flag given wins over the --config file; a flag not given leaves the file's value."""
    import vitkit.stages.train  # imported before the patch: no module keeps the stand-in
    from vitkit.cli import main
    from vitkit.errors import VitkitError

    got = []

    def train_model(cfg, output, **kw):
        got.append(cfg)
        raise VitkitError("stop before training")

    monkeypatch.setattr(vitkit.stages.train, "train_model", train_model)
    file = tmp_path / "c.yaml"
    file.write_text("epochs: 7\nlr: 0.5\nmomentum: 0.8\nstrict_data: true\ntransforms: [gmm]\n")
    argv = [
        "train",
        "-c",
        str(file),
        "--lr",
        "0.1",
        "--no-strict",
        "--epochs",
        "3",
        "-o",
        str(tmp_path / "r"),
    ]
    assert main(argv) == 2 and len(got) == 1
    cfg = got[0]
    assert (cfg.lr, cfg.epochs, cfg.strict_data) == (0.1, 3, False)  # flags
    assert (cfg.momentum, cfg.transforms) == (0.8, ["gmm"])  # the file's, no flag given
