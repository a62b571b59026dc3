"""The README's results block is what scripts/reproduce.py builds from results/*.json: the text
between the `<!-- results:begin -->` and `<!-- results:end -->` markers equals
table(load_reports()), so no number in it is edited by hand or left behind by a newer result."""
import importlib.util
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_readme_results_block_is_the_table_of_results_json():
    spec = importlib.util.spec_from_file_location("flaxen_reproduce_readme", os.path.join(ROOT, "scripts", "reproduce.py"))
    reproduce = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(reproduce)
    reports = reproduce.load_reports(os.path.join(ROOT, "results"))
    assert reports  # the README shows results, not only "not run" rows
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    assert readme.count(reproduce.BEGIN) == 1 and readme.count(reproduce.END) == 1
    block = readme.split(reproduce.BEGIN, 1)[1].split(reproduce.END, 1)[0]
    assert block == "\n" + reproduce.table(reports) + "\n"


def test_readme_compression_table_is_the_table_of_its_results_file():
    spec = importlib.util.spec_from_file_location("flaxen_compress_readme", os.path.join(ROOT, "scripts", "compress.py"))
    compress = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(compress)
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    assert readme.count(compress.BEGIN) == 1 and readme.count(compress.END) == 1
    block = readme.split(compress.BEGIN, 1)[1].split(compress.END, 1)[0]
    import json

    with open(os.path.join(ROOT, "results", "compress_sst2.json")) as f:
        assert block == "\n" + compress.table(json.load(f)) + "\n"
