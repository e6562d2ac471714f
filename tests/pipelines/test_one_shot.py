"""1-shot RLVR selection: variance scores and `megarl select-examples`."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest

from megarl.cli import main as cli_main
from megarl.pipelines.one_shot import population_std, select_top, variance_scores

ACC_LOG = Path(__file__).resolve().parents[2] / "data" / "dsr_sub_acc_step_500.json"


def test_population_std_hand_values():
    assert population_std([0.0, 1.0]) == 0.5  # the sample std would be 0.7071
    assert population_std([0.25, 0.25, 0.25]) == 0.0
    assert population_std([0.0, 0.0, 1.0, 1.0]) == pytest.approx(statistics.pstdev([0, 0, 1, 1]))


def test_ranking_order_and_ties():
    log = {"5": [0.0, 1.0], "2": [0.5, 0.5], "9": [0.0, 0.5], "1": [1.0, 0.0], "3": [0.5]}
    assert variance_scores(log) == [(1, 0.5), (5, 0.5), (9, 0.25), (2, 0.0), (3, 0.0)]
    assert select_top(log, 2) == [1, 5]
    with pytest.raises(ValueError, match=r"top must be in \[1, 5\]"):
        select_top(log, 6)


def test_dsr_sub_pool_reproduces_the_paper_numbers():
    scores = variance_scores(ACC_LOG)
    assert len(scores) == 1209
    (i1, s1), (i2, s2) = scores[:2]
    assert (i1, i2) == (124, 267)
    # data/README.md: pi1 std 0.407, then 0.396 -- the population std; the sample std is 0.411 / 0.400
    assert round(s1, 3) == 0.407 and round(s2, 3) == 0.396
    assert all(a[1] >= b[1] for a, b in zip(scores, scores[1:]))


def test_cli_prints_one_index_per_line(capsys):
    assert cli_main(["select-examples", "--acc-log", str(ACC_LOG), "--top", "2"]) == 0
    assert capsys.readouterr().out == "124\n267\n"


@pytest.mark.parametrize(
    "content, pattern",
    [
        (None, "does not exist"),
        ("{not json", "is not valid JSON"),
        ("[1, 2]", "expected a JSON object"),
        ("{}", "no examples"),
        ('{"a": [0.5]}', "example key 'a' is not an integer index"),
        ('{"1": []}', "example '1': expected a non-empty list"),
        ('{"1": [0.5, "x"]}', "example '1': accuracy 'x' is not a finite number"),
    ],
)
def test_cli_errors_name_the_file(tmp_path, capsys, content, pattern):
    path = tmp_path / "acc.json"
    if content is not None:
        path.write_text(content)
    assert cli_main(["select-examples", "--acc-log", str(path), "--top", "1"]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and pattern in err


def test_cli_rejects_top_beyond_pool(tmp_path, capsys):
    path = tmp_path / "acc.json"
    path.write_text(json.dumps({"1": [0, 1], "2": [1, 1]}))
    assert cli_main(["select-examples", "--acc-log", str(path), "--top", "3"]) == 2
    assert "--top must be in [1, 2]" in capsys.readouterr().err


def test_accuracy_log_round_trips_into_select_top(tmp_path):
    from megarl.pipelines.one_shot import AccuracyLog, load_acc_log, select_top

    log = AccuracyLog()
    log.add([3, 7, 3], [0.0, 0.5, 1.0])
    log.add([7, 9], [0.5, 0.25])
    assert log.history == {3: [0.0, 1.0], 7: [0.5, 0.5], 9: [0.25]}
    path = tmp_path / "run" / "acc_log.json"
    log.write(path)
    assert load_acc_log(path) == {3: [0.0, 1.0], 7: [0.5, 0.5], 9: [0.25]}
    assert select_top(path, 1) == [3]  # std 0.5; 7 and 9 have std 0
    restored = AccuracyLog()
    restored.load_state_dict(log.state_dict())
    assert restored.history == log.history
    with pytest.raises(ValueError, match="2 indices but 1 accuracies"):
        log.add([1, 2], [0.5])
