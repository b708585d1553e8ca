"""The checkpoint fuzzer in CI: a few hundred seeded cases over every file of a stories260K checkpoint folder
(single-file and sharded). Every case must be refused with a one-line FormatError naming the folder, or load
a model whose outputs equal the intact one's; no other exception, no silent acceptance, no slow case.

Longer runs: ``GQSA_FUZZ_CASES=10000 pytest tests/test_fuzz.py`` (``GQSA_FUZZ_SEED`` picks another seed), or
``python tests/fuzz_checkpoint.py --cases 10000`` for the table of counts per mutation class and outcome.
"""
import os

import pytest
import torch

from fuzz_checkpoint import MUTATIONS, Fuzzer, sharded_copy, table

CASES = int(os.environ.get("GQSA_FUZZ_CASES", 13 * 24))
SEED = int(os.environ.get("GQSA_FUZZ_SEED", 0))


@pytest.fixture(scope="module")
def fuzzer(s260k_folder, tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        bases = [s260k_folder, sharded_copy(s260k_folder, tmp_path_factory.mktemp("sharded") / "ck")]
        yield Fuzzer(bases, tmp_path_factory.mktemp("fuzz"), SEED)
    finally:
        torch.set_num_threads(threads)


def test_fuzzed_folders_are_refused_cleanly_or_load_equal(fuzzer):
    rows = fuzzer.run(CASES)
    bad = [r for r in rows if r["outcome"] not in ("refused", "equal")]
    print("\n" + table(rows))
    assert not bad, "\n".join(str(r) for r in bad[:10])
    # every class ran, and the classes meant to be refused were refused
    classes = {r["class"] for r in rows}
    assert classes == set(MUTATIONS) or CASES < len(MUTATIONS)
    assert all(r["outcome"] == "refused" for r in rows if r["expect"] == "refuse")
