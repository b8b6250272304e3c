"""GenEval-style scoring and the `flowgrpo eval geneval` command's input errors."""
import json

import numpy as np

from flowgrpo.cli import main
from flowgrpo.eval.geneval import markdown_table, prompt_diversity, report_markdown, score_images, write_report
from flowgrpo.prompts.shapes import load_split
from flowgrpo.shapes.render import render


def test_score_images_per_tag_and_overall(tmp_path):
    test = load_split("test")
    entries = [e for e in test if e["tag"] == "counting"][:10] + [e for e in test if e["tag"] == "colors"][:10]
    rng = np.random.default_rng(0)
    images = [render(e, rng) for e in entries]
    colors = [i for i, e in enumerate(entries) if e["tag"] == "colors"]
    images[colors[0]] = np.full_like(images[0], 128)  # one blank image fails
    r = score_images(images, entries)
    n_col = len(colors)
    assert r.accuracy["colors"] == (n_col - 1) / n_col and r.accuracy["counting"] == 1.0
    assert r.accuracy["overall"] == (r.accuracy["colors"] + 1.0) / 2  # mean over tags, not over images
    p = (n_col - 1) / n_col
    assert abs(r.stderr["colors"] - np.sqrt(p * (1 - p) / n_col)) < 1e-12 and r.stderr["counting"] == 0.0
    assert r.empty == 1 / len(entries) and r.malformed == 0.0
    # the blank image misses its object and therefore its colour; counting never fails
    assert r.failures == {"colors": {"color": 1 / n_col, "presence": 1 / n_col}}
    out = write_report(r, tmp_path, name="gt")
    assert json.loads((out / "results.json").read_text())["accuracy"]["counting"] == 1.0
    assert (out / "grid.png").is_file() and "| gt |" in markdown_table({"gt": r.summary()})
    report = (out / "report.md").read_text()
    assert f"| gt | colors | {100 / n_col:.0f}% | 0% | {100 / n_col:.0f}% | 0% | 0% |" in report
    assert "| gt | counting | 0% | 0% | 0% | 0% | 0% | 0% |" in report  # ground truth draws no spare objects
    assert r.spares == {"counting": 0.0, "colors": 0.0}


def test_count_errors_and_spares_say_whether_images_draw_too_many_or_too_few():
    counting = [e for e in load_split("test") if e["tag"] == "counting"]
    ask = {n: next(e for e in counting if e["include"][0] == {"class": "circle", "count": n}) for n in (2, 3, 4)}
    rng = np.random.default_rng(1)
    # images drawn for 3, 4, 2 and 4 circles, scored against prompts asking 2, 2, 4 and 4 circles
    images = [render(ask[drawn], rng) for drawn in (3, 4, 2, 4)]
    entries = [ask[2], ask[2], ask[4], ask[4]]
    r = score_images(images, entries)
    assert r.count_errors == {"-2": 0.25, "-1": 0.0, "0": 0.25, "+1": 0.25, "+2": 0.25}
    assert r.accuracy["counting"] == 0.25
    assert r.spares == {"counting": 0.5}  # 3 and 4 circles for "two circles"
    old = {k: v for k, v in r.summary().items() if k != "spares"} | {"count_errors": {}}
    text = report_markdown({"m": r.summary(), "old": old})
    assert "| m | counting | 0% | 75% | 0% | 0% | 0% | 50% |" in text and "| old | counting | 0% | 75% | 0% | 0% | 0% | – |" in text
    rows = text.split("drawn minus asked")[1]
    assert "| m | 25.0% | 0.0% | 25.0% | 25.0% | 25.0% |" in rows and "| old |" not in rows
    colors = [e for e in load_split("test") if e["tag"] == "colors"][:2]
    assert score_images([render(e, rng) for e in colors], colors).count_errors == {}  # no counting prompts


def test_prompt_diversity_is_the_mean_pixel_distance_within_each_prompt():
    a, b = {"prompt": "a"}, {"prompt": "b"}
    img = lambda v: np.full((2, 2, 3), v, dtype=np.uint8)  # noqa: E731
    # prompt a: images 0, 10, 40 -> pairs 10, 40, 30 -> 26.67; prompt b: 100, 100 -> 0; a lone image is skipped
    images = [img(0), img(10), img(40), img(100), img(100), img(7)]
    entries = [a, a, a, b, b, {"prompt": "c"}]
    assert abs(prompt_diversity(images, entries) - (80 / 3 + 0) / 2) < 1e-5  # float32 pixels
    assert np.isnan(prompt_diversity([img(0)], [a]))


def test_unknown_classes_and_bad_files_are_refused(tmp_path, capsys):
    f = tmp_path / "m.jsonl"
    f.write_text(json.dumps({"tag": "single_object", "include": [{"class": "dog", "count": 1}], "prompt": "a dog"}) + "\n")
    assert main(["eval", "geneval", "--prompts", str(f), "--out", str(tmp_path / "o")]) == 2
    assert "knows the Shapes classes" in capsys.readouterr().err
    f.write_text("{oops\n")
    assert main(["eval", "geneval", "--prompts", str(f), "--out", str(tmp_path / "o")]) == 2
    assert "m.jsonl:1: invalid JSON" in capsys.readouterr().err
