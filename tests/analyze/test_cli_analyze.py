import json

from vitkit.cli import main


def test_attack_writes_json_and_plot_into_the_run(trained_run):
    assert (
        main(["attack", str(trained_run), "--method", "pgd", "--eps", "8/255", "--steps", "3", "--n", "32"])
        == 0
    )
    out = trained_run / "attack-pgd"
    doc = json.loads((out / "attack.json").read_text())
    assert [r["method"] for r in doc["results"]] == ["fgsm", "pgd"]
    assert (out / "attack.png").stat().st_size > 1000
    assert not [p for p in trained_run.iterdir() if p.name.startswith(".attack")]  # no temp dir left


def test_bad_inputs_exit_2_with_one_line(trained_run, tmp_path, capsys):
    assert main(["attack", str(trained_run), "--eps", "8", "--n", "8"]) == 2
    assert "wrong units" in capsys.readouterr().err
    assert main(["similarity", str(trained_run), "timm:vitkit_tiny_p4_32", "--no-resize", "--n", "8"]) == 2
    assert "different input sizes" in capsys.readouterr().err
    assert (
        main(["similarity", str(trained_run), str(trained_run), "--metric", "cka-debiased", "--n", "3"]) == 2
    )
    assert "at least 4 samples" in capsys.readouterr().err
    (tmp_path / "x.png").write_bytes(b"")
    (tmp_path / "bags.csv").write_text("bag_id,path,label\na,x.png,1\na,x.png,0\n")
    assert (
        main(
            [
                "mil",
                "--features",
                str(trained_run),
                "--bags",
                f"csv:{tmp_path / 'bags.csv'}",
                "-o",
                str(tmp_path / "m"),
            ]
        )
        == 2
    )
    assert "mixed labels" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()


def test_perturb_similarity_attention_and_artifacts_write_their_outputs(trained_run, tmp_path):
    assert main(["perturb", str(trained_run), "--patches", "2", "--temperature", "1,2", "--n", "16"]) == 0
    rows = json.loads((trained_run / "perturb" / "perturb.json").read_text())["rows"]
    assert {r["temperature"] for r in rows} == {1.0, 2.0}
    assert (
        main(
            [
                "similarity",
                str(trained_run),
                str(trained_run),
                "--metric",
                "cka-linear,rsa",
                "--n",
                "16",
                "-o",
                str(tmp_path / "s"),
            ]
        )
        == 0
    )
    assert (tmp_path / "s" / "similarity.png").is_file()
    assert main(["attention", str(trained_run), "--images", "2", "-o", str(tmp_path / "a")]) == 0
    assert (tmp_path / "a" / "attention.png").is_file()
    assert main(["artifacts", str(trained_run), "--n", "8", "-o", str(tmp_path / "r")]) == 0
    assert json.loads((tmp_path / "r" / "artifacts.json").read_text())["grid"] == [4, 4]


def test_dta_cli_with_block_score_and_per_block_asr(trained_run):
    args = ["attack", str(trained_run), "--method", "dta", "--downstream", str(trained_run), "--n", "16"]
    assert main([*args, "--steps", "2", "--search-score", "block", "--per-block"]) == 0
    doc = json.loads((trained_run / "attack-dta" / "dta.json").read_text())
    assert doc["config"]["search_score"] == "block" and sorted(doc["layer_scores"]) == ["0", "1", "2", "3"]
    r = doc["downstream"][str(trained_run)]
    assert r[f"block_{doc['layer']}"] == r["dta"]  # the searched block's row is the DTA attack itself
    assert (trained_run / "attack-dta" / "dta.png").stat().st_size > 1000
