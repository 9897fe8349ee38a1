from benchmarks.harness.markdown import markdown_table


def test_markdown_table_aligns_numbers_and_formats_cells():
    table = markdown_table(["name", "value:"], [("a|b", 1.23456), ("c", None)])
    lines = table.splitlines()
    assert lines[0] == "| name | value |"
    assert lines[1] == "| --- | ---: |"
    assert lines[2] == "| a\\|b | 1.23 |"
    assert lines[3] == "| c | - |"
