from mpcl.training.run_log import CsvLog, plot_curves


def test_csv_log_widens_for_new_columns_and_truncates_on_resume(tmp_path):
    log = CsvLog(tmp_path / "log.csv")
    log.append({"iteration": 1, "loss": 1.0, "loss_a": 1.0})
    log.append({"iteration": 2, "loss": 0.5, "loss_b": 0.5})  # a method's second stage: new term
    rows = log.rows()
    assert list(rows[0]) == ["iteration", "loss", "loss_a", "loss_b"]
    assert rows[0]["loss_b"] == "" and rows[1]["loss_a"] == "" and rows[1]["loss_b"] == "0.5"
    reopened = CsvLog(tmp_path / "log.csv")
    reopened.truncate_after(1)
    assert [row["iteration"] for row in reopened.rows()] == ["1"]
    assert plot_curves(log.rows(), [], tmp_path / "curves.png", "t").is_file()
